"""Benchmark ``mindyouzhi data compress``: wall time, peak memory and growth from 10k to 100k samples.

    .venv/bin/python bench/compress.py                      # 10k and 100k samples → 10 %
    .venv/bin/python bench/compress.py --sizes 2000 20000   # a quicker look

Each size gets a synthetic finance pool (several categories, mixed quality and complexity, one
sample in five a near-copy of an earlier one, so information gain has something to find), then a
fresh child process compresses it with the heuristic tagger, so peak RSS is that of the
compression alone.  Targets on 2 cores: 100k → 10 % in under 5 minutes and 2 GiB, and near-linear
growth (time ratio 100k/10k close to 10, far from 100).  Results go to bench/results/compress.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "compress.json"

TOPICS = {
    "loan": ("房贷", "等额本息", "月供", "提前还款", "贷款利率", "授信额度"),
    "deposit": ("定期存款", "大额存单", "活期利息", "储蓄计划"),
    "wealth": ("理财产品", "基金净值", "年化收益率", "赎回规则", "资产配置"),
    "transfer": ("跨行转账", "汇款手续费", "转账限额", "收款账户"),
    "tax": ("个税专项附加扣除", "增值税发票", "应纳税所得额"),
    "fx": ("美元汇率", "购汇额度", "跨境汇款", "结汇"),
    "insurance": ("医疗险理赔", "寿险保费", "投保年龄"),
    "credit_card": ("信用卡账单", "最低还款", "分期手续费", "免息期"),
}
FILLER = ("根据相关规定", "一般来说", "需要注意的是", "具体以银行公告为准", "建议结合自身情况", "可以通过手机银行办理",
          "在实际操作中", "按照合同约定", "如有疑问可咨询客服", "从风险角度看")


def synthetic_sample(rng: random.Random, index: int, earlier: list) -> dict:
    if earlier and rng.random() < 0.2:
        base = dict(rng.choice(earlier))
        base["output"] = base["output"] + rng.choice(FILLER) + "。"  # a near-duplicate
        return base
    category = rng.choice(list(TOPICS))
    terms = TOPICS[category]
    amount = rng.randint(1, 500) * 1000
    rate = rng.randint(150, 600) / 100
    question = (f"关于{rng.choice(terms)}：本金{amount}元，年利率{rate}%，期限{rng.randint(1, 30)}年，"
                f"{rng.choice(['请计算每月需要支付多少', '请说明如何办理', '请比较两种方案', '请解释相关规则'])}？")
    if rng.random() < 0.3:
        question += "并且分别列出计算步骤，假设利率不变，要求结果保留两位小数。"
    steps = [f"{k + 1}. {rng.choice(FILLER)}，{rng.choice(terms)}的{rng.choice(['计算', '办理', '规则', '风险'])}"
             f"需要考虑{rng.choice(terms)}，数值约为{rng.randint(1, 99999)}元。" for k in range(rng.randint(1, 12))]
    answer = "\n".join(steps) + ("\n因此，结果如上。" if rng.random() < 0.6 else "")
    return {"id": index, "instruction": question, "output": answer}


def make_pool(path: Path, size: int, seed: int) -> None:
    rng = random.Random(seed)
    earlier: list = []
    with open(path, "w", encoding="utf-8") as handle:
        for index in range(size):
            sample = synthetic_sample(rng, index, earlier)
            if len(earlier) < 2000 and rng.random() < 0.05:
                earlier.append(sample)
            handle.write(json.dumps(sample, ensure_ascii=False) + "\n")


def child(args) -> None:
    """Runs in a fresh process: compress once and print the measurements as JSON."""
    from mindyouzhi.datagen.compress import CompressSettings, compress_file, parse_budget
    from mindyouzhi.io_utils import peak_rss_bytes

    start = time.perf_counter()
    report = compress_file(args.input, args.output, CompressSettings(parse_budget(args.budget, "samples"), seed=0),
                           overwrite=True)
    wall = time.perf_counter() - start
    print(json.dumps({"wall_seconds": wall, "peak_rss_bytes": peak_rss_bytes(), "kept": report["kept"],
                      "pool": report["pool"], "categories_kept": report["categories_kept"],
                      "categories_in_pool": report["categories_in_pool"],
                      "zlib_gain_evaluations": report["zlib_gain_evaluations"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--budget", default="10%")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    runs = []
    with tempfile.TemporaryDirectory(prefix="mindyouzhi-bench-") as tmp:
        for size in args.sizes:
            pool = Path(tmp) / f"pool-{size}.jsonl"
            make_pool(pool, size, args.seed)
            command = [sys.executable, __file__, "--child", "--input", str(pool), "--output",
                       str(Path(tmp) / f"kept-{size}.jsonl"), "--budget", args.budget]
            result = subprocess.run(command, check=True, capture_output=True, text=True)
            measured = json.loads(result.stdout.strip().splitlines()[-1])
            measured.update({"size": size, "input_bytes": pool.stat().st_size})
            runs.append(measured)
            print(f"{size:>8} samples ({measured['input_bytes'] / 2**20:.1f} MiB) → kept {measured['kept']}: "
                  f"{measured['wall_seconds']:.1f} s, peak RSS {measured['peak_rss_bytes'] / 2**20:.0f} MiB, "
                  f"categories {measured['categories_kept']}/{measured['categories_in_pool']}")
            pool.unlink()

    growth = None
    if len(runs) >= 2:
        small, large = runs[0], runs[-1]
        growth = {"size_ratio": large["size"] / small["size"],
                  "time_ratio": large["wall_seconds"] / small["wall_seconds"],
                  "memory_ratio": large["peak_rss_bytes"] / small["peak_rss_bytes"]}
        print(f"growth {small['size']} → {large['size']}: time ×{growth['time_ratio']:.1f}, "
              f"memory ×{growth['memory_ratio']:.2f} (size ×{growth['size_ratio']:.0f})")
    results = {"date": dt.datetime.now().isoformat(timespec="seconds"), "budget": args.budget,
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
               "runs": runs, "growth": growth}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"results written to {args.results}")


if __name__ == "__main__":
    main()
