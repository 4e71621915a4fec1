#!/usr/bin/env python3
"""Write the IMDb sample that ships inside the package (src/peftbench/sample_data/imdb).

    python tools/make_imdb_sample.py ../shared/data/imdb

A seeded (seed 0), stratified draw from the full IMDb Parquet copy: 1,000 positive and 1,000 negative
reviews from its train split, 500 of each from its test split, texts unchanged, rows shuffled.
"""

import argparse
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

OUT = Path(__file__).resolve().parents[1] / "src" / "peftbench" / "sample_data" / "imdb"
PER_CLASS = {"train": 1000, "test": 500}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("imdb", type=Path, help="folder with the full train.parquet and test.parquet")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in PER_CLASS.items():
        table = pq.read_table(args.imdb / f"{split}.parquet", columns=["text", "label"])
        labels = table.column("label").to_numpy()
        picked = np.concatenate([rng.choice(np.flatnonzero(labels == c), n, replace=False) for c in (0, 1)])
        pq.write_table(table.take(rng.permutation(picked)), OUT / f"{split}.parquet", compression="zstd")
        print(f"{split}: {len(picked)} rows, {(OUT / f'{split}.parquet').stat().st_size / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
