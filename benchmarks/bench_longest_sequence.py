"""Longest sequence that trains one step: lorakit's fused loss vs peft + transformers' plain loss (full logits).

The model: an 8B Llama shape built from ``LlamaConfig`` (hidden 4096, 32 layers, intermediate 14336, 32 heads, 8 kv
heads, the Llama-3 vocabulary of 128,256, untied head, rope theta 500,000), random weights, built directly in bf16 on
the device (no download), SDPA attention, gradient checkpointing on (``use_reentrant=False``), LoRA r=16 alpha=32 on
all linear layers (lm_head excluded), the same adapter weights in both libraries (peft's copied into lorakit by
name). A step: forward with ``labels = input_ids`` (B1 x T), backward, AdamW step.

Both libraries run in one process on the same base weights, one after the other (peft, then lorakit on the base
that ``unload()`` returns). For each: a doubling search over T (from ``--start``) until a step raises
``torch.cuda.OutOfMemoryError``, then a bisection down to ``--resolution`` tokens; ``empty_cache()`` after every
probe. Each probe's peak memory is recorded; a straight line through the probes' peaks (peak = a + b T) gives a
projected longest length, printed beside the measured one. The search is bounded by time (``--budget-s``): a probe
whose predicted time (a T + c T^2 through the two longest probes that trained, or the longest one's scaled by
(T'/T)^2) does not fit in what is left is not started, and the result then says the bound was the time, not the
memory. lorakit's first probe past peft's longest length is 4x that length (the issue's target), else 2x, whichever
the time left allows.

Throughput: at peft's longest length, one more step of each library after the probe there (lorakit is warmed up at
a short length first), tokens / step time.

    python benchmarks/bench_longest_sequence.py                                 # the H200 run, ~2 minutes
    python benchmarks/bench_longest_sequence.py --shape tiny --device cpu --start 64 --max-len 256   # dry run
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from cases.common import adapter_params, adapter_state, load_adapter_state, lora_kwargs

SHAPES = {
    "8b": dict(hidden=4096, layers=32, intermediate=14336, heads=32, kv_heads=8, vocab=128256),
    "tiny": dict(hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2, vocab=1024),
}


def build_base(shape: dict, device: str, checkpointing: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=shape["hidden"],
        num_hidden_layers=shape["layers"],
        intermediate_size=shape["intermediate"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        vocab_size=shape["vocab"],
        max_position_embeddings=1 << 20,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.requires_grad_(False)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model.train()


def free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step(model, optimizer, seq: int, vocab: int, device: str) -> float:
    ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(seq)).to(device)
    optimizer.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    optimizer.step()
    return loss.item()


class Prober:
    """Runs single steps at given lengths, catching out-of-memory, and keeps what each probe gave."""

    def __init__(self, name, model, optimizer, args, deadline: float):
        self.name, self.model, self.optimizer, self.args, self.deadline = name, model, optimizer, args, deadline
        self.results: dict[int, dict] = {}

    def predicted_s(self, seq: int) -> float:
        """A step's seconds at ``seq``: s = a T + c T^2 through the two longest probes that trained (a line and a
        parabola being the linear layers and attention), or the longest one's scaled by (T'/T)^2 (an upper bound)."""
        done = sorted((t, r["s"]) for t, r in self.results.items() if r["ok"])
        if not done:
            return 0.0
        t1, s1 = done[-1]
        guess = s1 * max(1.0, (seq / t1) ** 2)
        if len(done) >= 2:
            t0, s0 = done[-2]
            c = (s1 / t1 - s0 / t0) / (t1 - t0)
            a = s1 / t1 - c * t1
            if a > 0 and c > 0:
                guess = max(a * seq + c * seq * seq, s1 if seq >= t1 else 0.0)
        return guess

    def fits_in_time(self, seq: int) -> bool:
        return time.perf_counter() + self.predicted_s(seq) <= self.deadline

    def probe(self, seq: int) -> bool:
        dev = self.args.device
        free(dev)
        if dev.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            loss = step(self.model, self.optimizer, seq, self.args.vocab, dev)
            sync(dev)
            ok, err = True, None
        except torch.cuda.OutOfMemoryError as exc:
            ok, err, loss = False, str(exc).split("\n")[0][:160], None
        seconds = time.perf_counter() - start
        self.optimizer.zero_grad(set_to_none=True)
        peak = torch.cuda.max_memory_allocated() / 2**30 if dev.startswith("cuda") else None
        free(dev)
        self.results[seq] = {"ok": ok, "s": seconds, "peak_gib": peak, "loss": loss, "error": err}
        peak_s = f"{peak:7.1f} GiB" if peak is not None else "-"
        state = f"ok   loss {loss:.4f}" if ok else f"OOM  {err}"
        print(f"  {self.name:8s} T={seq:7d}  {seconds:7.2f} s  peak {peak_s}  {state}", flush=True)
        return ok

    def search(self, start: int) -> tuple[int | None, str]:
        """(longest length that trained, what stopped the search: 'memory', 'time' or 'max-len')."""
        a = self.args
        good, bad = None, None
        for seq, r in self.results.items():  # probes already made (e.g. the throughput point)
            if r["ok"]:
                good = max(good or 0, seq)
            else:
                bad = min(bad or seq, seq)
        seq = max(start, good * 2 if good else start)
        while bad is None:
            if seq > a.max_len:
                return good, "max-len"
            if not self.fits_in_time(seq):
                return good, "time"
            if self.probe(seq):
                good, seq = seq, seq * 2
            else:
                bad = seq
        if good is None:
            return None, "memory"
        while bad - good > a.resolution:
            mid = (good + bad) // 2 // a.resolution * a.resolution
            if mid <= good:
                break
            if not self.fits_in_time(mid):
                return good, "time (bisection)"
            if self.probe(mid):
                good = mid
            else:
                bad = mid
        return good, "memory"

    def projected(self, capacity_gib: float | None) -> int | None:
        points = [(t, r["peak_gib"]) for t, r in self.results.items() if r["ok"] and r["peak_gib"] is not None]
        if capacity_gib is None or len(points) < 2:
            return None
        points.sort()
        (t0, p0), (t1, p1) = points[-2], points[-1]
        slope = (p1 - p0) / (t1 - t0)
        return int(t1 + (capacity_gib - p1) / slope) if slope > 0 else None

    def timed(self, seq: int) -> float | None:
        """Seconds of one more step at ``seq`` (None if it ran out of memory)."""
        dev = self.args.device
        free(dev)
        try:
            sync(dev)
            start = time.perf_counter()
            step(self.model, self.optimizer, seq, self.args.vocab, dev)
            sync(dev)
            return time.perf_counter() - start
        except torch.cuda.OutOfMemoryError:
            return None
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            free(dev)


def make_optimizer(model):
    return torch.optim.AdamW(list(adapter_params(model).values()), lr=1e-5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--start", type=int, default=8192, help="first length of the doubling search")
    parser.add_argument("--resolution", type=int, default=4096, help="bisection stops at this gap")
    parser.add_argument("--max-len", type=int, default=1 << 20)
    parser.add_argument("--budget-s", type=float, default=120.0, help="probes' time, both libraries together")
    parser.add_argument("--peft-share", type=float, default=0.4, help="share of the budget for peft's search")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--liger", action="store_true", help="let lorakit use Liger's kernel when installed")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    args.vocab = shape["vocab"]
    import peft
    import transformers

    import lorakit

    dev = args.device
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu"
    capacity = torch.cuda.get_device_properties(dev).total_memory / 2**30 if dev.startswith("cuda") else None
    print(
        f"{args.shape} {shape}, B1, bf16, r=16 all-linear, SDPA, checkpointing {not args.no_checkpointing}; {name}; "
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}",
        flush=True,
    )
    t0 = time.perf_counter()
    base = build_base(shape, dev, not args.no_checkpointing)
    sync(dev)
    print(f"model built in {time.perf_counter() - t0:.1f} s", flush=True)
    begin = time.perf_counter()
    out: dict = {"shape": args.shape, "device": name}

    # peft + the plain transformers loss
    torch.manual_seed(1)
    ref = peft.get_peft_model(base, peft.LoraConfig(**lora_kwargs()))
    state = adapter_state(ref)
    p = Prober("peft", ref, make_optimizer(ref), args, begin + args.budget_s * args.peft_share)
    peft_len, peft_stop = p.search(args.start)
    peft_tps = None
    if peft_len:
        s = p.timed(peft_len)
        peft_tps = peft_len / s if s else None
    out["peft"] = {"longest": peft_len, "stopped_by": peft_stop, "projected": p.projected(capacity),
                   "tokens_per_s": peft_tps, "probes": p.results}  # fmt: skip
    base = ref.unload()
    base.requires_grad_(False)
    del ref, p
    free(dev)

    # lorakit with the fused loss
    ours = lorakit.get_peft_model(base, lorakit.LoraConfig(**lora_kwargs()))
    load_adapter_state(ours, state)
    ours.enable_fused_loss(chunk_size=args.chunk_size, use_liger=args.liger)
    ours.train()
    q = Prober("lorakit", ours, make_optimizer(ours), args, begin + args.budget_s)
    warm = min(args.start, peft_len or args.start)
    q.timed(warm)  # warm-up (kernels, autotuning) outside the figures
    ours_tps = None
    if peft_len:
        q.probe(peft_len)
        s = q.timed(peft_len)
        ours_tps = peft_len / s if s else None
    if peft_len:  # the target first: 4x peft's longest, else 2x, whichever the time left allows
        for ratio in (4, 2):
            if peft_len * ratio <= args.max_len and q.fits_in_time(peft_len * ratio):
                q.probe(peft_len * ratio)
                break
    ours_len, ours_stop = q.search(args.start)
    out["lorakit"] = {"longest": ours_len, "stopped_by": ours_stop, "projected": q.projected(capacity),
                      "tokens_per_s": ours_tps, "probes": q.results}  # fmt: skip

    for lib in ("peft", "lorakit"):
        print(f"{lib}: " + json.dumps({k: v for k, v in out[lib].items() if k != "probes"}, default=str))
    print("\n| library | longest T that trained | search stopped by | projected (peak memory) | tokens/s at peft's T |")
    print("| --- | --- | --- | --- | --- |")
    for lib in ("peft", "lorakit"):
        r = out[lib]
        tps = f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "-"
        print(f"| {lib} | {r['longest']} | {r['stopped_by']} | {r['projected']} | {tps} |")
    if peft_len and ours_len:
        bound = " (a lower bound: stopped by time)" if ours_stop.startswith("time") else ""
        print(f"longest lorakit / peft: {ours_len / peft_len:.2f}x{bound} (target >= 4x)")
    if peft_tps and ours_tps:
        print(f"tokens/s at T={peft_len}: lorakit / peft {ours_tps / peft_tps:.2f}x (target >= 1.3x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()
