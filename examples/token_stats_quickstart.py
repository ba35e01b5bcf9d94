"""Quickstart: a TDPO2 loss on one preference pair through chunked_token_stats.

Random Llama-shaped activations (no download): the policy's and the reference's final hidden
states at the response positions, and the frozen lm_head. Prints the loss, the per-sequence
KL, and the peak memory of the op next to a full-logits implementation of the same loss.

    python examples/token_stats_quickstart.py [--T 512] [--H 1024] [--V 32000]
"""

import argparse
import time

import torch
import torch.nn.functional as F

import sparsepo_lite as sp
from sparsepo_lite.peak_memory import PeakMemory


def tdpo2_loss(stats, seq_ids, beta=0.1, alpha=0.5):
    """TDPO2 on one pair (row 0 chosen, row 1 rejected); stats from chunked_token_stats."""
    ref_sums = torch.zeros(2).index_add(0, seq_ids, stats.ref_logp)
    kl_sums = torch.zeros(2).index_add(0, seq_ids, stats.kl)  # detached per-token KL
    # seq_sums = sum(logp) on both rows, plus alpha*KL on the rejected row only (its kl_weight);
    # the rejected row is subtracted, giving -alpha*KL_l. The chosen KL enters from the
    # detached per-token KL: the stop-gradient of TDPO2.
    margin = (stats.seq_sums[0] - ref_sums[0]) - (stats.seq_sums[1] - ref_sums[1]) + alpha * kl_sums[0]
    return -F.logsigmoid(beta * margin)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=512, help="response tokens per sequence")
    ap.add_argument("--H", type=int, default=1024)
    ap.add_argument("--V", type=int, default=32000)
    args = ap.parse_args()
    torch.manual_seed(0)
    T, H, V = args.T, args.H, args.V
    weight = torch.randn(V, H) / H**0.5
    hidden = torch.randn(2 * T, H).requires_grad_(True)
    ref_hidden = hidden.detach() + 0.1 * torch.randn(2 * T, H)
    labels = torch.randint(0, V, (2 * T,))
    seq_ids = torch.arange(2).repeat_interleave(T)
    kl_weight = torch.cat([torch.zeros(T), 0.5 * torch.ones(T)])  # alpha on rejected tokens
    print(f"extension built: {sp.HAVE_EXTENSION}; one pair, T = {T}, H = {H}, V = {V}")

    with PeakMemory() as pm:
        t0 = time.perf_counter()
        stats = sp.chunked_token_stats(
            hidden, weight, labels, seq_ids, 2, kl_weight=kl_weight, ref=sp.ExactReference(ref_hidden, weight)
        )
        loss = tdpo2_loss(stats, seq_ids)
        loss.backward()
        dt = time.perf_counter() - t0
    kl = torch.zeros(2).index_add(0, seq_ids, stats.kl)
    print(
        f"chunked op : loss {loss.item():.6f}  seq KL chosen {kl[0]:.4f} rejected {kl[1]:.4f}  "
        f"peak {pm.peak_bytes / 2**20:7.1f} MiB  {dt:.2f} s"
    )

    h2 = hidden.detach().clone().requires_grad_(True)
    with PeakMemory() as pm:
        t0 = time.perf_counter()
        lp = torch.log_softmax(h2 @ weight.T, -1)
        lq = torch.log_softmax(ref_hidden @ weight.T, -1)
        logp = lp.gather(1, labels[:, None]).squeeze(1)
        kl_tok = (lq.exp() * (lq - lp)).sum(-1)
        s = torch.zeros(2).index_add(0, seq_ids, logp - lq.gather(1, labels[:, None]).squeeze(1))
        klw = torch.zeros(2).index_add(0, seq_ids, kl_tok)
        eager = -F.logsigmoid(0.1 * (s[0] - s[1] - 0.5 * (klw[1] - klw[0].detach())))
        eager.backward()
        dt = time.perf_counter() - t0
    print(f"full logits: loss {eager.item():.6f}  peak {pm.peak_bytes / 2**20:7.1f} MiB  {dt:.2f} s")
    err = (hidden.grad - h2.grad).abs().max().item()
    print(f"max |grad difference| = {err:.2e}")


if __name__ == "__main__":
    main()
