"""Write the embedded demo dataset (scikit-learn digits composed into 64 x 64 scenes) as png + csv manifests.

Example: python jobs/make_demo_data.py --out assets/demo/data --num-train 1000 --num-val 64 --seed 0
"""

from __future__ import annotations

import argparse

from ray_certseg.data.demo import write_demo_dataset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default="assets/demo/data", help="output folder (train/, val/, *.csv, classes.json)"
    )
    parser.add_argument("--num-train", type=int, default=1000)
    parser.add_argument("--num-val", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, path in write_demo_dataset(args.out, args.num_train, args.num_val, args.seed).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
