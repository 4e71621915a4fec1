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
MATRIX = [(m, f) for m in sorted(registry.METHODS) for f in MODELS
          if not (registry.get(m).kind == "tfidf" and f != "tiny_encoder")]


@pytest.mark.parametrize("method, model_fixture", MATRIX)
def test_method_trains_saves_and_reloads(method, model_fixture, request, tiny_data, tmp_path):
    model = request.getfixturevalue(model_fixture)
    raw = study(model, tiny_data, [method], train={"epochs": 1})
    (res,) = run_study(raw, tmp_path / "study")
    assert res["status"] == "success", res.get("error")
    m = res["metrics"]
    assert 0.0 <= m["test_accuracy"] <= 1.0
    assert m["trainable_params"] > 0 and m["total_params"] >= m["trainable_params"]
    kind = registry.get(method).kind
    if kind in ("peft", "head", "bitfit"):
        assert m["trainable_params"] < m["total_params"] * 0.9, "a parameter-efficient method trained most weights"
    if kind != "tfidf":
        assert res["reload_check"]["identical_predictions"], res["reload_check"]
        # P-tuning saves its prompt encoder's fp32 output; in memory it is recomputed under bf16 autocast.
        tol = 1e-2 if method == "p_tuning" else 1e-4
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
    (res,) = run_study(study(tiny_decoder, data, [method], data={"train_size": 150, "validation_size": 30,
                                                                  "test_size": 90}), tmp_path / "s")
    assert res["status"] == "success", res.get("error")
    assert res["config"]["label_names"] == ["mixed", "neg", "pos"]
    assert set(res["test_predictions"]) <= {0, 1, 2} and res["reload_check"]["identical_predictions"]
    run_dir = tmp_path / "s" / "runs" / res["run_id"]
    out = predict_texts(run_dir, ["good great film"])
    assert set(out[0]["probabilities"]) == {"mixed", "neg", "pos"}
