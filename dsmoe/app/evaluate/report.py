"""The text form of a ``dsmoe eval`` result (llama-perplexity's names and order)."""

from __future__ import annotations


def format_result(r: dict) -> str:
    lines = [f"model        {r['model']}",
             f"text         {r['text_tokens']} tokens, {r['text_bytes']} bytes; {r['windows']} windows",
             f"convention   {r['convention']}",
             f"scored       {r['tokens']} tokens ({r['bytes']} bytes)",
             f"PPL          {r['ppl']:.4f} ± {r['ppl_stderr']:.4f}",
             f"bits/byte    {r['bits_per_byte']:.4f}"]
    b = r.get("baseline")
    if b:
        pct = "  ".join(f"{k}%: {v:.6f}" for k, v in b["kld_percentiles"].items())
        lines += [f"baseline     {b['name']}: PPL {b['ppl']:.4f}, bits/byte {b['bits_per_byte']:.4f}",
                  f"PPL ratio    {b['ppl_ratio']:.5f}  (ln ratio {b['ln_ppl_ratio']:+.6f})",
                  f"KLD          mean {b['kld_mean']:.6f} ± {b['kld_stderr']:.6f}  max {b['kld_max']:.6f}  min {b['kld_min']:.6f}",
                  f"KLD pct      {pct}",
                  f"same top-1   {100 * b['same_top1']:.2f} %",
                  f"Δp           mean {100 * b['dp_mean']:+.4f} %  RMS {100 * b['dp_rms']:.4f} %"]
    if r.get("saved_logits"):
        lines.append(f"saved        {r['saved_logits']}")
    return "\n".join(lines)
