"""Times torch.optim.RAdam (foreach) on the benchmark's shapes (run with torch's interpreter).

Invoked by bench/optimizer_step.py as ``python _torch_worker.py SET --steps N --runs R
--threads T``; prints one ``BENCH_RESULT {json}`` line: seconds per step.
"""

import argparse

import torch

from _common import SHAPE_SETS, emit, make_arrays, summary, time_runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("shape_set", choices=sorted(SHAPE_SETS))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    values, grads = make_arrays(SHAPE_SETS[args.shape_set]())
    params = [torch.nn.Parameter(torch.from_numpy(v)) for v in values]
    for param, grad in zip(params, grads):
        param.grad = torch.from_numpy(grad)
    del values, grads
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "modes": {}}
    optimizer = torch.optim.RAdam(params, lr=1e-3, foreach=True)

    @torch.no_grad()
    def step():
        optimizer.step()

    result["modes"]["foreach"] = summary(time_runs(step, lambda: None, args.steps, args.runs))
    emit(result)


if __name__ == "__main__":
    main()
