#!/usr/bin/env python
"""One ADMM-Grad solve at two checkouts, single-thread CPU seconds (issue 9).

    python bench/solve_ab.py /path/to/checkout-before     # then the same with this repo's root

Imports `pruning` from the checkout given, so two worktrees (e.g. `git worktree add
/tmp/before b295bc5`) can be timed alternately. Shapes are SmolLM2's (576 hidden,
1536 MLP); Grams of 4096 random tokens with log-normal channel scales; 50 %
unstructured, paper defaults; mean of 3 solves after one warm-up.
"""
import sys
import time

import torch

sys.path.insert(0, sys.argv[1])
torch.set_num_threads(1)
from pruning.admm import AdmmSystem, admm_solve  # noqa: E402

gen = torch.Generator().manual_seed(0)
result = {}
for d_out, d_in in ((576, 576), (1536, 576), (576, 1536)):
    x = torch.randn(4096, d_in, generator=gen) * torch.exp(torch.randn(d_in, generator=gen))
    gram = x.T @ x
    weight = torch.randn(d_out, d_in, generator=gen)
    system = AdmmSystem.from_gram(gram)
    admm_solve(weight, system, sparsity=0.5)
    start = time.process_time()
    for _ in range(3):
        admm_solve(weight, system, sparsity=0.5)
    result[f"{d_out}x{d_in}"] = round((time.process_time() - start) / 3, 4)
print(sys.argv[1], result)
