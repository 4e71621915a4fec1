"""What summing gradients in bf16 costs under `train.optimizer: adamw_bf16` with gradient accumulation.

    python benchmarks/bf16_accumulation.py --data DIR --out benchmarks/results/NAME.json \
        [--model minilm] [--batch 16] [--max-length 256] [--device cpu]

With bf16 weights, autograd adds each micro-step's gradient into a bf16 `.grad` (with fp32 weights the sum
is fp32). On one batch of IMDb reviews, dropout off, bf16 weights under bf16 autocast, for micro-batches of
half the batch down to 1, the batch's gradient three ways: the micro-steps' gradients summed in bf16 (what
training does), the same gradients summed in fp32, and one step over the whole batch. Reported per
micro-batch: the relative L2 distance of the bf16 sum from the fp32 sum (the accumulation's own error), and
of each sum from the one-step gradient (what micro-batching changes anyway under bf16 autocast).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def batch_gradients(model, enc, labels, micro: int, device: str):
    """The batch's gradient from micro-steps of `micro` items: summed in bf16 and in fp32, flattened."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    bf16 = [torch.zeros_like(p) for p in params]
    fp32 = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    n = len(labels)
    for start in range(0, n, micro):
        model.zero_grad(set_to_none=True)
        part = slice(start, start + micro)
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            out = model(input_ids=enc["input_ids"][part], attention_mask=enc["attention_mask"][part])
            loss = torch.nn.functional.cross_entropy(out.logits.float(), labels[part])
        (loss * len(labels[part]) / n).backward()
        for b, f, p in zip(bf16, fp32, params):
            if p.grad is not None:
                b += p.grad  # as autograd accumulates into a bf16 .grad
                f += p.grad.float()
    flat = lambda xs: torch.cat([x.float().flatten() for x in xs])  # noqa: E731
    return flat(bf16), flat(fp32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="a folder with train.parquet (text, label)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import pandas as pd
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from peftbench.models import resolve

    torch.manual_seed(0)
    path = resolve(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    df = pd.read_parquet(Path(args.data) / "train.parquet").sample(args.batch, random_state=0)
    enc = tok(list(df.text), truncation=True, max_length=args.max_length, padding=True, return_tensors="pt")
    enc = {k: v.to(args.device) for k, v in enc.items()}
    labels = torch.tensor(df.label.values, device=args.device)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.bfloat16)
    model.to(args.device).train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    _, one_step = batch_gradients(model, enc, labels, args.batch, args.device)
    rel = lambda a, b: round(float((a - b).norm() / b.norm()), 6)  # noqa: E731
    rows = []
    micro = args.batch // 2
    while micro >= 1:
        bf16, fp32 = batch_gradients(model, enc, labels, micro, args.device)
        rows.append(
            {
                "micro_batch": micro,
                "micro_steps": -(-args.batch // micro),
                "bf16_sum_vs_fp32_sum": rel(bf16, fp32),
                "fp32_sum_vs_one_step": rel(fp32, one_step),
                "bf16_sum_vs_one_step": rel(bf16, one_step),
            }
        )
        micro //= 2
    out = {
        "argv": sys.argv[1:],
        "machine": platform.node() if args.device == "cpu" else torch.cuda.get_device_name(args.device),
        "torch": torch.__version__,
        "model": args.model,
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
