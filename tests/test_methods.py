"""Every registered method x a tiny encoder and a tiny decoder: trains, saves, reloads, predicts identically.

The matrix is generated from the registry, so a method cannot be added without being tested.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_study, study

from peftbench import methods as registry
from peftbench.predict import predict_texts

MODELS = ["tiny_encoder", "tiny_decoder"]


# tfidf uses no model, so it is paired with one fixture only.
MATRIX = [
    (m, f)
    for m in sorted(registry.METHODS)
    for f in MODELS
    if not (registry.get(m).kind == "tfidf" and f != "tiny_encoder")
]


@pytest.mark.parametrize("method, model_fixture", MATRIX)
def test_method_trains_saves_and_reloads(method, model_fixture, request, tiny_data, tmp_path):
    model = request.getfixturevalue(model_fixture)
    raw = study(model, tiny_data, [method], train={"epochs": 1})
    (res,) = run_study(raw, tmp_path / "study")
    assert res["status"] == "success", res.get("error")
    m = res["metrics"]
    assert 0.0 <= m["test_accuracy"] <= 1.0 and 0.0 < m["validation_loss"] < 10
    assert m["trainable_params"] > 0 and m["total_params"] >= m["trainable_params"]
    kind = registry.get(method).kind
    if kind in ("peft", "head", "bitfit"):
        assert m["trainable_params"] < m["total_params"] * 0.9, (
            "a parameter-efficient method trained most weights"
        )
    if kind != "tfidf":
        assert res["reload_check"]["identical_predictions"], res["reload_check"]
        # P-tuning saves its prompt encoder's fp32 output; in memory it is recomputed under bf16 autocast.
        # PiSSA is saved converted to a rank-2r LoRA on the original weights: W + [B B0][A -A0] is W_res + BA
        # up to rounding (bf16 autocast where the CPU has it).
        tol = {"p_tuning": 1e-2, "pissa": 1e-2}.get(method, 1e-4)
        assert res["reload_check"]["max_abs_logit_diff"] < tol
        assert len(res["history"]) == 1 and res["history"][0]["train_loss"] > 0
    run_dir = tmp_path / "study" / "runs" / res["run_id"]
    saved = (run_dir / "adapter") if kind == "peft" else (run_dir / "model")
    assert saved.is_dir() and m["adapter_size_mb"] > 0
    # `peftbench predict` goes through the same reload path; its labels match the stored predictions.
    texts = json.loads((tmp_path / "study" / "study.json").read_text())
    assert texts["final_runs"] == [res["run_id"]]
    out = predict_texts(run_dir, ["good great superb film", "bad awful boring film"])
    assert [set(o["probabilities"]) for o in out] == [{"0", "1"}] * 2
    assert all(abs(sum(o["probabilities"].values()) - 1) < 1e-3 for o in out)


def test_peft_adapter_reloads_with_plain_peft(tiny_encoder, tiny_data, tmp_path):
    """A user without peftbench: AutoModelForSequenceClassification + PeftModel.from_pretrained."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    (res,) = run_study(study(tiny_encoder, tiny_data, ["lora"], train={"epochs": 1}), tmp_path / "s")
    run_dir = tmp_path / "s" / "runs" / res["run_id"]
    base = AutoModelForSequenceClassification.from_pretrained(tiny_encoder, num_labels=2)
    model = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    tok = AutoTokenizer.from_pretrained(tiny_encoder)
    texts = ["good great film", "bad awful film", "the plot was dull and weak"]
    with torch.no_grad():
        plain = model(**tok(texts, return_tensors="pt", padding=True)).logits.softmax(-1).numpy()
    ours = predict_texts(run_dir, texts)
    ours_p = np.array([[o["probabilities"]["0"], o["probabilities"]["1"]] for o in ours])
    assert np.allclose(plain, ours_p, atol=2e-3)


def test_decoder_gets_a_pad_token(tiny_decoder, tiny_data, tmp_path):
    (res,) = run_study(study(tiny_decoder, tiny_data, ["full"], train={"epochs": 1}), tmp_path / "s")
    assert res["status"] == "success"
    assert res["config"]["pad_token_id"] is not None


def test_roles_resolve_per_architecture():
    assert registry.targets_regex("bert", ["q", "v"]) == r".*\.(query|value)$"
    assert registry.targets_regex("llama", ["q", "v"]) == r".*\.(q_proj|v_proj)$"
    assert "Wqkv" in registry.targets_regex("modernbert", ["q", "k", "v"])
    assert "query_proj" in registry.targets_regex("deberta-v2", ["q"])
    with pytest.raises(Exception, match="target_modules"):
        registry.targets_regex("someunknownarch", ["q"])


def test_every_method_names_its_source():
    for m in registry.METHODS.values():
        assert m.source and m.description
        if m.kind != "tfidf":
            assert m.learning_rate and m.learning_rate > 0


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_three_classes_with_string_labels_on_a_decoder(method, tiny_decoder, tmp_path):
    from conftest import write_dataset

    data = write_dataset(tmp_path / "d3", "csv", n_train=180, n_test=90, classes=3, string_labels=True)
    (res,) = run_study(
        study(tiny_decoder, data, [method], data={"train_size": 150, "validation_size": 30, "test_size": 90}),
        tmp_path / "s",
    )
    assert res["status"] == "success", res.get("error")
    assert res["config"]["label_names"] == ["mixed", "neg", "pos"]
    assert set(res["test_predictions"]) <= {0, 1, 2} and res["reload_check"]["identical_predictions"]
    run_dir = tmp_path / "s" / "runs" / res["run_id"]
    out = predict_texts(run_dir, ["good great film"])
    assert set(out[0]["probabilities"]) == {"mixed", "neg", "pos"}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_classifier_fine_tuned_for_other_labels_gets_a_new_head(method, tiny_encoder, tmp_path):
    """A checkpoint with a 2-class head, trained on 3 classes: the head is replaced (as a missing one would
    be), trained and saved with the run, which reloads to its predictions. A checkpoint whose body does not
    fit its own config is an error."""
    from conftest import write_dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from peftbench import models
    from peftbench.errors import UserError

    two = tmp_path / "two-labels"
    AutoModelForSequenceClassification.from_pretrained(tiny_encoder, num_labels=2).save_pretrained(two)
    AutoTokenizer.from_pretrained(tiny_encoder).save_pretrained(two)
    data = write_dataset(tmp_path / "d3", n_train=180, n_test=90, classes=3)
    raw = study(two, data, [method], data={"train_size": 150, "validation_size": 30, "test_size": 90})
    (res,) = run_study(raw, tmp_path / "s")
    assert res["status"] == "success", res.get("error")
    assert set(res["test_predictions"]) <= {0, 1, 2} and res["reload_check"]["identical_predictions"]
    out = predict_texts(tmp_path / "s" / "runs" / res["run_id"], ["good great film"])
    assert len(out[0]["probabilities"]) == 3
    cfg = json.loads((two / "config.json").read_text())
    (two / "config.json").write_text(json.dumps({**cfg, "intermediate_size": cfg["intermediate_size"] * 2}))
    with pytest.raises(UserError, match=r"do not have the shapes its config.json gives"):
        models.load_base(_spec_of(tmp_path / "s", res), ["0", "1", "2"], "cpu")


def _spec_of(study_dir, res):
    """The RunSpec a run's folder recorded."""
    from peftbench.spec import RunSpec

    return RunSpec.from_dict(json.loads((study_dir / "runs" / res["run_id"] / "spec.json").read_text()))


def _tiny(kind: str):
    """A tiny *ForSequenceClassification of each family, built from its config (no download)."""
    import transformers as T

    small = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_labels=2,
        vocab_size=128,
    )
    cfgs = {
        "bert": T.BertConfig(**small),
        "roberta": T.RobertaConfig(**small, pad_token_id=1),
        "deberta-v2": T.DebertaV2Config(**small),
        "modernbert": T.ModernBertConfig(
            **small, pad_token_id=0, global_attn_every_n_layers=2, local_attention=4
        ),  # layer 1 sees a 4-token window
        "llama": T.LlamaConfig(**small, num_key_value_heads=2, pad_token_id=0),
        "qwen2": T.Qwen2Config(**small, num_key_value_heads=2, pad_token_id=0),
        "mistral": T.MistralConfig(**small, num_key_value_heads=2, pad_token_id=0),
    }
    return T.AutoModelForSequenceClassification.from_config(cfgs[kind])


FAMILIES = ["bert", "roberta", "deberta-v2", "modernbert", "llama", "qwen2", "mistral"]


@pytest.mark.parametrize("family", FAMILIES)
def test_default_targets_fit_each_architecture(family):
    """Every role names real modules (Linear layers, norms for `norm`) in each supported family, and the
    role-based methods (LoRA on all linear layers, IA3 with its feed-forward subset, LN tuning) apply to it
    and give logits that differ from the untouched model's only where training could change them."""
    import re

    import peft
    import torch

    model = _tiny(family).eval()
    assert model.config.model_type == family
    names = dict(model.named_modules())
    for role in registry.ROLES:
        rx = registry.targets_regex(family, [role])
        hits = [n for n in names if re.fullmatch(rx, n)]
        assert hits, f"{family}: role {role} matches no module"
        want = (torch.nn.LayerNorm, torch.nn.RMSNorm) if role == "norm" else (torch.nn.Linear,)
        assert all(isinstance(names[n], want) or "Norm" in type(names[n]).__name__ for n in hits), (
            family,
            role,
        )
        assert not any(h in n for n in hits for h in registry.HEAD_MODULES), f"{family}: {role} hits the head"
    ids = torch.randint(2, 128, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    for name in ("lora_all", "ia3", "ln_tuning"):
        m = registry.get(name)
        cfg = registry.build_peft_config(m, dict(m.options), family, total_steps=10)
        fresh = _tiny(family)
        fresh.load_state_dict(model.state_dict())  # same base weights as `model`
        pm = peft.get_peft_model(fresh, cfg)
        assert pm.get_nb_trainable_parameters()[0] > 0
        with torch.no_grad():
            out = pm.eval()(input_ids=ids, attention_mask=mask).logits
        # LoRA starts at zero and IA3 at one, LN tuning copies the norms: at initialisation nothing changes.
        assert torch.allclose(out, ref, atol=1e-5), (family, name)


@pytest.mark.parametrize(
    "family, attn, wrap, want",
    [
        ("bert", "sdpa", None, "4d-bidirectional"),
        ("bert", "eager", None, "4d-bidirectional"),
        ("llama", "sdpa", None, "4d-causal"),
        ("modernbert", "sdpa", None, "2d"),  # sliding-window layers: a plain 4D mask would drop the window
        ("bert", "sdpa", "prompt_tuning", "2d"),  # PEFT extends the 2D mask over the soft prompt
    ],
)
def test_ready_4d_mask_only_where_it_changes_nothing(family, attn, wrap, want):
    """The probe picks the 4D mask form that gives the 2D mask's logits and keeps 2D where none does; the
    chosen form then matches on other batches."""
    import peft
    import torch

    from peftbench import batches as train

    torch.manual_seed(0)
    model = _tiny(family)
    model.config._attn_implementation = attn
    if wrap:
        m = registry.get(wrap)
        model = peft.get_peft_model(model, registry.build_peft_config(m, dict(m.options), family, 10))
    seqs = [np.arange(2, 2 + n) % 120 + 2 for n in (5, 9, 14, 20, 7)]
    mode = train.choose_mask_mode(model, seqs, pad_id=0, device="cpu", probe_on_cpu=True)
    assert mode == want
    # no probe on the CPU by default
    assert train.choose_mask_mode(model, seqs, pad_id=0, device="cpu") == "2d"
    ids, mask = train.collate(seqs[2:], 0)
    model.eval()
    with torch.no_grad():
        a = train.model_forward(model, ids, mask).logits
        b = train.model_forward(model, ids, mask, mode).logits
    assert torch.allclose(a, b, atol=1e-4)


def test_all_methods_study_lists_every_registered_method():
    from pathlib import Path

    import yaml

    from peftbench import config

    path = Path(__file__).resolve().parents[1] / "studies" / "all-methods.yaml"
    raw = yaml.safe_load(path.read_text())
    assert sorted(raw["methods"]) == sorted(registry.METHODS)
    config.validate({**raw, "model": "minilm", "data": {**raw["data"], "name": None, "path": "x"}})
