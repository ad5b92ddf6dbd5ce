"""How far stage 2's first steps move the weights at the paper's learning rate: ours against the paper's formulation.

A learning rate means the paper's step only together with the paper's LoRA start: with Adam each step moves a factor
by about lr whatever the gradient's size, so the weight moves by about lr x |down|. This bench trains one rank-1 LoRA
on all 32 cross-attention key/value matrices of SD1.5's shape (inner widths 320/640/1280, 768-wide text features) on
the same attention-suppression problem three ways, in one process, and compares how much each changes the weights:

  reference  the paper's formulation, written here from its facts: down ~ N(0, (1/rank)^2), up zero, scale 1,
             AdamW (weight decay 0.01), gradient-norm clip 1.0, batch 1
  ours       mace_core.train.init_lora + mace_core.train.train_task (what the Train node runs)
  uniform    our previous start, down uniform in +-1/sqrt(in), through the same loop (for contrast)

The problem: per layer, fixed queries of 64 pixels attend (8 heads) over the keys of a prompt's 77 token features;
the loss is the unsquared norm of the attention paid to the concept's tokens and the end/padding tokens, plus the
same through a next-layer query made from the attention output (so the value matrices get a gradient, as the real
loss reaches them through later layers). Each step draws one of 8 synthetic prompts. Reported: the relative weight
change |dW|_F / |W|_F averaged over the matrices after steps 1, 10 and 50, and its ratio to the reference (mean over
seeds; the reference draws its own factors, so ratios near 1 are within draw noise). Goal: ours within 1.5x.

    python bench/bench_lora_step.py                 # CPU, lr 1e-4 (the paper's for celebrities and styles)
    python bench/bench_lora_step.py --lr 1e-5 --seeds 5
"""

import argparse
import logging
import math
import statistics

import torch
from _common import CTX, WIDTHS, D, add_device_args, load_core, start

log = logging.getLogger("bench")

HEADS, PIXELS, PROMPTS, RANK = 8, 64, 8, 1
CONCEPT_TOKENS = (4, 5)  # two words of the concept, then the end token at 7 and padding after it
END_AT = 7
CHECKPOINTS = (1, 10, 50)


class Problem:
    """Fixed weights, queries and prompts of SD1.5's shape; loss(factors, prompt) is the attention-suppression loss."""

    def __init__(self, seed: int, device):
        g = torch.Generator().manual_seed(1000 + seed)
        self.keys = [f"layer{i}.attn2.to_{kv}.weight" for i in range(len(WIDTHS)) for kv in "kv"]
        self.widths = {k: w for k, w in zip(self.keys, [w for w in WIDTHS for _ in range(2)])}
        self.w = {k: (torch.randn(self.widths[k], D, generator=g) / D**0.5).to(device) for k in self.keys}
        self.q = [(torch.randn(PIXELS, w, generator=g)).to(device) for w in WIDTHS]
        self.mix = [(torch.randn(w, w, generator=g) / w**0.5).to(device) for w in WIDTHS]  # next layer's to_q
        shared = torch.randn(CTX, D, generator=g)
        self.prompts = [(shared + torch.randn(CTX, D, generator=g)).to(device) for _ in range(PROMPTS)]
        self.positions = torch.tensor(list(CONCEPT_TOKENS) + list(range(END_AT, CTX)), device=device)

    def shapes(self):
        return {k: tuple(w.shape) for k, w in self.w.items()}

    def _suppressed(self, q, k, width):
        dh = width // HEADS
        qh = q.reshape(q.shape[0], HEADS, dh).transpose(0, 1)
        kh = k.reshape(k.shape[0], HEADS, dh).transpose(0, 1)
        probs = (qh @ kh.transpose(-1, -2) * dh**-0.5).softmax(-1)
        return probs, probs.index_select(-1, self.positions).norm()

    def loss(self, up, down, prompt: int) -> torch.Tensor:
        e = self.prompts[prompt]
        total = 0.0
        for i, width in enumerate(WIDTHS):
            kk, kv = self.keys[2 * i], self.keys[2 * i + 1]
            k = e @ (self.w[kk] + up[kk] @ down[kk]).T
            v = e @ (self.w[kv] + up[kv] @ down[kv]).T
            probs, term = self._suppressed(self.q[i], k, width)
            out = (probs @ v.reshape(CTX, HEADS, -1).transpose(0, 1)).transpose(0, 1).reshape(PIXELS, width)
            _, term2 = self._suppressed(out @ self.mix[i], k, width)
            total = total + term + term2
        return total / len(WIDTHS)


def relative_change(problem, up, down) -> float:
    with torch.no_grad():
        return statistics.fmean(float((up[k] @ down[k]).norm() / problem.w[k].norm()) for k in problem.keys)


def reference_run(problem, lr, steps, seed, device) -> dict[int, float]:
    """The paper's formulation from its facts, written independently of mace_core."""
    g = torch.Generator().manual_seed(50_000 + seed)
    down = {k: torch.empty(RANK, D).normal_(0.0, 1.0 / RANK, generator=g).to(device).requires_grad_(True)
            for k in problem.keys}
    up = {k: torch.zeros(problem.widths[k], RANK, device=device, requires_grad=True) for k in problem.keys}
    params = [*up.values(), *down.values()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    picks = torch.Generator().manual_seed(seed)
    out = {}
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        problem.loss(up, down, int(torch.randint(PROMPTS, (1,), generator=picks))).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step in CHECKPOINTS:
            out[step] = relative_change(problem, up, down)
    return out


class _Task:
    """mace_core.train.ConceptTask over the problem, recording the change at the checkpoints."""

    def __init__(self, problem, up, down, seed):
        self.problem, self.up, self.down = problem, up, down
        self.picks = torch.Generator().manual_seed(seed)  # the same prompt sequence as the reference
        self.changes = {}

    def parameters(self):
        return [*self.up.values(), *self.down.values()]

    def loss(self, step, generator):
        if step in CHECKPOINTS:  # called before step `step + 1`: `step` steps are done
            self.changes[step] = relative_change(self.problem, self.up, self.down)
        return self.problem.loss(self.up, self.down, int(torch.randint(PROMPTS, (1,), generator=self.picks)))


def ours_run(core, problem, lr, steps, seed, device, uniform=False) -> dict[int, float]:
    train = core.train
    gen = train.concept_generator(seed, 0)
    up, down = train.init_lora(problem.shapes(), RANK, gen, device=device)
    if uniform:  # the start this pack used before: the Kaiming-uniform bound for a=sqrt(5)
        with torch.no_grad():
            for k, d in down.items():
                d.copy_((torch.rand(d.shape, generator=gen) * 2 - 1).to(device) / math.sqrt(d.shape[1]))
    task = _Task(problem, up, down, seed)
    train.train_task(task, train.TrainConfig(steps=steps, learning_rate=lr, seed=seed), gen)
    task.changes[steps] = relative_change(problem, up, down)
    return task.changes


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lr", type=float, default=1e-4, help="learning rate (the paper: 1e-4 or 1e-5)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seeds", type=int, default=3)
    add_device_args(ap)
    args = ap.parse_args()
    device = start(args)
    core = load_core()
    import mace_core.train  # noqa: F401  (load_core's package, by path)

    runs = {"reference": [], "ours": [], "uniform": []}
    for seed in range(args.seeds):
        problem = Problem(seed, device)
        runs["reference"].append(reference_run(problem, args.lr, args.steps, seed, device))
        runs["ours"].append(ours_run(core, problem, args.lr, args.steps, seed, device))
        runs["uniform"].append(ours_run(core, problem, args.lr, args.steps, seed, device, uniform=True))
    steps = [s for s in CHECKPOINTS if s <= args.steps]
    mean = {name: {s: statistics.fmean(r[s] for r in rs) for s in steps} for name, rs in runs.items()}
    log.info("device: %s; %d matrices (SD1.5 to_k/to_v, d=%d), rank %d, lr %g, %d seeds; relative weight change "
             "|dW|/|W| averaged over the matrices", device, 2 * len(WIDTHS), D, RANK, args.lr, args.seeds)
    log.info("%6s %12s %12s %12s %14s %16s", "step", "reference", "ours", "uniform", "ours / ref", "uniform / ref")
    for s in steps:
        ref = mean["reference"][s]
        log.info("%6d %12.3e %12.3e %12.3e %13.2fx %15.3fx", s, ref, mean["ours"][s], mean["uniform"][s],
                 mean["ours"][s] / ref, mean["uniform"][s] / ref)
    last = steps[-1]
    ratio = mean["ours"][last] / mean["reference"][last]
    per_seed = [o[last] / r[last] for o, r in zip(runs["ours"], runs["reference"])]
    log.info("after %d steps: ours / reference %.2fx (per seed %s); goal within 1.5x: %s; the uniform start moves "
             "the weights %.0fx less than the reference", last, ratio, ", ".join(f"{x:.2f}" for x in per_seed),
             "met" if 1 / 1.5 <= ratio <= 1.5 else "MISSED", mean["reference"][last] / mean["uniform"][last])


if __name__ == "__main__":
    main()
