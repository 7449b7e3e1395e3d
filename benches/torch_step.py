"""The PyTorch side's training step and its timing, shared by train_gpt2_pytorch.py and
train_mlm_pytorch.py: the step lmtrain's trainer takes (zero grads, forward with labels,
backward, clip_grad_norm_(1.0), foreach AdamW with weight decay 0.01 off `no_decay` parameters),
timed by its median over `--steps` after `--warmup`, printed as a human line on stderr and one
JSON object on stdout."""
import json
import sys
import time


def time_training(args, model, no_decay, inputs, **extra):
    """Times the step of `model` on `inputs` (keyword arguments of its forward, labels included).
    `no_decay(name)` says which parameters get no weight decay; `extra` goes into the JSON."""
    import torch

    model.train()
    decay, plain = [], []
    for name, p in model.named_parameters():
        (plain if no_decay(name) else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": plain, "weight_decay": 0.0}],
        lr=5e-5, betas=(0.9, 0.999), eps=1e-8, foreach=True,
    )
    step_model = torch.compile(model) if args.compile else model

    def step():
        opt.zero_grad(set_to_none=True)
        loss = step_model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    for _ in range(args.warmup):
        step()
    times = []
    t_start = time.perf_counter()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - t_start > args.max_seconds:
            break
    times.sort()
    median = times[len(times) // 2]
    tokens = args.batch * args.block
    result = {
        "impl": "pytorch" + ("-compile" if args.compile else "-eager"),
        **extra,
        "torch": torch.__version__,
        "threads": args.threads,
        "attn": getattr(model.config, "_attn_implementation", None),
        "steps": len(times),
        "step_ms_median": median * 1e3,
        "tokens_per_s": tokens / median,
        "tokens_per_s_mean": tokens * len(times) / sum(times),
        "params": sum(p.numel() for p in model.parameters()),
    }
    print(f"{result['impl']}: {result['tokens_per_s']:.0f} tokens/s (median step {median*1e3:.1f} ms over "
          f"{len(times)} steps, {args.threads} threads)", file=sys.stderr)
    print(json.dumps(result))
