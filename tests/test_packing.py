"""Padding-free packed batches: the same logits and loss as padded batches on BERT, RoBERTa and Llama
shapes, every example once per epoch and never split, and the switch's rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import run_study, set_up_recipe, study

from peftbench import packing
from peftbench.batches import collate, make_batches, model_forward

CONFIGS = {
    "bert": ("BertConfig", {}),
    "roberta": ("RobertaConfig", {"pad_token_id": 1, "max_position_embeddings": 80}),
    "llama-gqa": ("LlamaConfig", {"num_key_value_heads": 2, "pad_token_id": 0}),
}


def tiny(kind: str, num_labels: int = 3):
    import transformers

    name, extra = CONFIGS[kind]
    cfg = getattr(transformers, name)(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=num_labels,
        initializer_range=0.3,  # logits of order 1: a small difference shows
        **extra,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForSequenceClassification.from_config(cfg).eval()


def items(lengths=(5, 17, 9, 30, 2)):
    rng = np.random.default_rng(0)
    return [rng.integers(3, 100, size=n) for n in lengths]


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_packed_and_padded_batches_give_the_same_logits_and_loss(kind):
    model, seqs = tiny(kind), items()
    pad = model.config.pad_token_id or 0
    arch = packing.architecture(model)
    y = torch.tensor([0, 1, 2, 1, 0])
    ids, mask = collate(seqs, pad, 8)
    ref = model_forward(model, ids, mask, labels=y)
    loss, logits = packing.packed_forward(model, arch, *packing.pack(seqs, pad, 16, None, arch[2]), 64, y)
    assert logits.shape == ref.logits.shape
    torch.testing.assert_close(logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref.loss, rtol=1e-5, atol=1e-5)


def test_attention_stays_within_each_sequence():
    """The same row with every token in one segment (attention across sequences) changes the logits."""
    model, seqs = tiny("bert"), items()
    arch = packing.architecture(model)
    ids, pos, offsets, segments, picks = packing.pack(seqs, 0, 16, None, last=False)
    _, apart = packing.packed_forward(model, arch, ids, pos, offsets, segments, picks, 64)
    _, mixed = packing.packed_forward(model, arch, ids, pos, offsets, torch.zeros_like(segments), picks, 64)
    assert (apart - mixed).abs().max() > 1e-2 * apart.abs().max()


def test_a_lora_model_packs_through_its_adapters_and_head():
    from peft import LoraConfig, get_peft_model

    model = tiny("bert")
    cfg = LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"], init_lora_weights=False)
    model = get_peft_model(model, cfg).eval()
    seqs = items()
    ids, mask = collate(seqs, 0, 8)
    ref = model_forward(model, ids, mask).logits
    arch = packing.architecture(model)
    _, logits = packing.packed_forward(model, arch, *packing.pack(seqs, 0, 16, None, False), 64)
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    plain = tiny("bert")  # the adapters are in the packed path: without them the logits differ
    _, without = packing.packed_forward(
        plain, packing.architecture(plain), *packing.pack(seqs, 0, 16, None, False), 64
    )
    assert (without - logits).abs().max() > 1e-4


@pytest.mark.parametrize("last", [False, True])
def test_the_packer_keeps_every_example_once_and_never_splits_one(last):
    rng = np.random.default_rng(1)
    seqs = [rng.integers(3, 100, size=n) for n in rng.integers(1, 60, size=203)]
    lengths = np.array([len(s) for s in seqs])
    seen = []
    for batch in make_batches(lengths, 16, rng, group_by_length=True):
        ids, pos, offsets, segments, picks = packing.pack([seqs[j] for j in batch], 0, 64, None, last)
        ids, pos, offsets = ids[0].numpy(), pos[0].numpy(), offsets.numpy()
        assert len(ids) % 64 == 0 and offsets[-1] == len(ids) and offsets[-1] > offsets[-2]  # a padding tail
        for k, j in enumerate(batch):
            a, b = offsets[k], offsets[k + 1]
            assert np.array_equal(ids[a:b], seqs[j]) and np.array_equal(pos[a:b], np.arange(b - a))
            assert picks[k] == (b - 1 if last else a) and (segments[a:b] == k).all()
            seen.append(j)
    assert sorted(seen) == list(range(len(seqs)))


def test_a_long_padding_tail_stays_inside_the_position_table():
    """A row padded far beyond its sequences (CUDA pads rows to multiples of 512): the tail is no sequence
    and must not count positions past the model's table (512 here; on an H200 a tail counting past a
    128-position table failed a CUDA index assertion)."""
    model, seqs = tiny("bert"), items()
    assert model.config.max_position_embeddings > max(len(s) for s in seqs)
    ids, pos, offsets, segments, picks = packing.pack(seqs, 0, 1024, None, last=False)
    assert ids.shape[1] == 1024 and int(pos.max()) == max(len(s) for s in seqs) - 1
    assert (pos[0, offsets[-2] :] == 0).all()
    _, logits = packing.packed_forward(
        model, packing.architecture(model), ids, pos, offsets, segments, picks, 512
    )
    ref = model_forward(model, *collate(seqs, 0, 8)).logits
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


def test_token_saving_counts_padding_against_packed_rows():
    lengths = np.array([10, 100, 50, 50])
    # padded to 64s: 2 x 128 + 2 x 64 = 384 tokens; packed to 64s: 128 + 128 = 256
    saving = packing.token_saving(lengths, [np.array([0, 1]), np.array([2, 3])], 64, 64)
    assert saving == pytest.approx(1 - 256 / 384)


def test_packed_training_follows_the_padded_loss_trajectory(no_dropout_encoder, tiny_data, tmp_path):
    """Forced on the CPU: the same steps as padded batches, the same losses and test accuracy."""
    got = {}
    for on in (True, False):
        raw = study(no_dropout_encoder, tiny_data, ["full"], train={"packing": on})
        (r,) = run_study(raw, tmp_path / str(on))
        assert r["status"] == "success"
        got[on] = r
    assert got[True]["metrics"]["packing"] == "on"
    assert got[False]["metrics"]["packing"] == "off (packing: false)"
    losses = [[h["train_loss"] for h in got[on]["history"]] for on in (True, False)]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)
    assert got[True]["metrics"]["test_accuracy"] == got[False]["metrics"]["test_accuracy"]


def test_auto_on_the_cpu_and_prompt_methods_say_why_they_do_not_pack(tiny_encoder, tiny_data, tmp_path):
    raw = study(tiny_encoder, tiny_data, ["lora"], train={"epochs": 1})
    (r,) = run_study(raw, tmp_path / "auto")
    assert r["metrics"]["packing"] == "auto packs on CUDA only"
    raw = study(tiny_encoder, tiny_data, ["prompt_tuning"], train={"epochs": 1, "packing": True})
    (r,) = run_study(raw, tmp_path / "prompt")
    assert r["status"] == "failed"
    assert r["error"].startswith("packing: true, but not built for prompt methods")


def test_auto_packs_only_where_it_saves_enough_tokens():
    model, seqs = tiny("bert"), items()
    arch, why = packing.choose(model, seqs, 0, "cuda", None, "auto", None, None, saving=0.04)
    assert arch is None and why == "saves 4.0% of the padded tokens (auto packs from 10%)"


def test_an_unsupported_model_does_not_pack_and_insisting_is_an_error():
    import transformers

    from peftbench.errors import UserError

    cfg = transformers.DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    model = transformers.AutoModelForSequenceClassification.from_config(cfg)
    arch, why = packing.choose(model, items(), 0, "cuda", None, "auto", None, None, saving=0.5)
    assert arch is None and why.startswith("not built for distilbert models")
    with pytest.raises(UserError, match="packing: true, but not built for distilbert"):
        packing.choose(model, items(), 0, "cuda", None, True, None, None, saving=0.5)


def test_auto_packs_graphed_steps_only():
    assert packing.eager_reason("auto", None) is None
    assert packing.eager_reason(True, "gradient accumulation") is None
    why = packing.eager_reason("auto", "gradient accumulation")
    assert why == "auto packs graphed steps only; these are not (gradient accumulation)"


def test_plan_probes_and_times_packed_batches(tiny_encoder, tiny_data, tmp_path, capsys):
    import json

    from peftbench import cli

    study_file = tmp_path / "s.yaml"
    study_file.write_text(json.dumps(study(tiny_encoder, tiny_data, ["lora"], train={"packing": True})))
    with pytest.raises(SystemExit) as e:
        cli.main(["plan", str(study_file), "--out", str(tmp_path / "out")])
    assert e.value.code == 0
    (row,) = json.loads((tmp_path / "out" / "plan.json").read_text())["rows"]
    assert row["fits"] and 0 < row["epoch_seconds"] < 60


@pytest.mark.parametrize("task", ["regression", "multi_label"])
def test_a_decoder_trains_packed_on_scores_and_label_sets(task, tiny_decoder, tmp_path):
    """Llama's head at each sequence's last token, with transformers' MSE or BCE loss: the same losses as
    padded batches (no dropout in this model), and the task's metrics."""
    from test_tasks import _write

    from peftbench import metrics

    folder = _write(tmp_path / "d", task, n_train=120)
    got = {}
    for on in (True, False):
        raw = study(
            tiny_decoder,
            folder,
            [{"name": "full", "learning_rate": 3e-3}],
            task=task,
            # fp32: a CPU with native bf16 would autocast, and packed and padded bf16 sums round apart
            train={"packing": on, "max_length": 24, "precision": "fp32"},
            data={"train_size": 100, "validation_size": 20, "test_size": None},
        )
        (got[on],) = run_study(raw, tmp_path / str(on))
        assert got[on]["status"] == "success", got[on].get("error")
    assert got[True]["metrics"]["packing"] == "on"
    losses = [[h["train_loss"] for h in got[on]["history"]] for on in (True, False)]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)
    metric = f"test_{metrics.default_metric(task)}"
    assert got[True]["metrics"][metric] == pytest.approx(got[False]["metrics"][metric], abs=1e-3)


def test_a_checkpointed_probe_or_run_uses_padded_batches(tiny_encoder, tiny_data, tmp_path, monkeypatch):
    """Packed batches are not built for gradient checkpointing: the memory plan's checkpointed probes run
    padded batches, and insisting on both is a one-line error."""
    raw = study(tiny_encoder, tiny_data, ["full"], train={"packing": True, "epochs": 1})
    recipe = set_up_recipe(raw, tmp_path)
    calls, real = [], packing.packed_forward
    monkeypatch.setattr(packing, "packed_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    recipe.probe(16, True)
    assert calls == [] and recipe.arch is not None
    recipe.probe(16, False)
    assert calls
    raw["train"]["gradient_checkpointing"] = True
    (r,) = run_study(raw, tmp_path / "both")
    assert r["status"] == "failed" and r["error"].startswith("packing: true, but not built for gradient")


def test_the_probes_agree_within_autocasts_rounding_or_the_padded_paths_own_noise():
    """`batches.logits_gap`, which the packing and layer-norm probes share: 2% of the largest logit under
    autocast, 0.1% in fp32, or twice what the padded path disagrees with itself."""
    import torch

    from peftbench.batches import logits_gap

    ref = torch.tensor([[1.0, -1.0], [0.5, 0.0]])
    alone = ref + 1e-4
    assert logits_gap(ref + 0.01, ref, alone, torch.bfloat16) is None
    diff, noise = logits_gap(ref + 0.01, ref, alone, None)
    assert abs(diff - 0.01) < 1e-6 and abs(noise - 1e-4) < 1e-6
    assert logits_gap(ref + 0.01, ref, ref + 0.006, None) is None  # within twice the path's own noise
