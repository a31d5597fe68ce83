"""Rendering of the training benchmark's JSON reports (Markdown tables for the README)."""

from __future__ import annotations

GIB = 2**30


def _device(rep) -> str:
    return rep["env"].get("gpu") or f"CPU, torch threads {rep['env']['threads']}"


def markdown_table(reports) -> str:
    """A Markdown table of measured rows: device, precision, model, mode, physical batch, img/s,
    peak memory and the ratio to the non-private row of the same model, device and precision
    (wall clock; and, for CPU runs, of process CPU time per image)."""
    lines = ["| device | precision | model | norm | mode | physical batch | img/s | peak GiB "
             "| ratio to non-private | ratio, CPU time |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    for rep in reports:
        cfg = rep["config"]
        device = _device(rep)
        precision = "bf16 autocast" if cfg.get("bf16") else "fp32"
        if cfg.get("channels_last"):
            precision += ", channels_last"
        model = f"{{}} {cfg['encoder']} OS{cfg['output_stride']} crop {cfg['crop']}"
        for r in rep["results"]:
            if r.get("img_per_s") is None:
                continue
            peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "n/a"
            ratio = (f"{r['ratio_to_nonprivate']:.2f}×" if r.get("ratio_to_nonprivate")
                     else "n/a")
            cpu = r.get("cpu_time_ratio_to_nonprivate")
            lines.append(f"| {device} | {precision} | {model.format(r['arch'])} | {r['norm']} "
                         f"| {r['mode']} | {r['batch']} | {r['img_per_s']:.3g} | {peak} "
                         f"| {ratio} | {f'{cpu:.2f}×' if cpu else 'n/a'} |")
    return "\n".join(lines)


def memory_table(reports) -> str:
    """A Markdown table of the memory rows (``--memory-batches``): measured peak of one step at
    each batch, the fitted memory per sample and fixed part, the per-sample ratio to
    non-private, and the largest physical batch in the budget."""
    lines = ["| device | model | norm | mode | peak GiB of one step (batch) | per sample GiB "
             "| fixed GiB | per sample ÷ non-private | largest batch in {budget} |",
             "|---|---|---|---|---|---:|---:|---:|---:|"]
    budget = None
    for rep in reports:
        cfg = rep["config"]
        model = f"{{}} {cfg['encoder']} OS{cfg['output_stride']} crop {cfg['crop']}"
        for r in rep.get("memory", []):
            if r.get("per_sample_bytes") is None:
                lines.append(f"| {_device(rep)} | {model.format(r['arch'])} | {r['norm']} "
                             f"| {r['mode']} | failed: {r.get('error', '?')[:60]} | | | | |")
                continue
            budget = r["budget_bytes"]
            peaks = ", ".join(f"{p['peak_bytes'] / GIB:.2f} ({p['batch']})" for p in r["points"])
            ratio = r.get("per_sample_ratio_to_nonprivate")
            lines.append(f"| {_device(rep)} | {model.format(r['arch'])} | {r['norm']} "
                         f"| {r['mode']} | {peaks} | {r['per_sample_bytes'] / GIB:.3f} "
                         f"| {r['fixed_bytes'] / GIB:.2f} "
                         f"| {f'{ratio:.2f}×' if ratio else 'n/a'} "
                         f"| {r['max_batch_in_budget']} |")
    lines[0] = lines[0].format(budget=f"{budget / 1e9:g} GB" if budget else "budget")
    return "\n".join(lines)


def summary_lines(report) -> list:
    """The plain-text summary printed at the end of a run."""
    out = []
    header = (f"{'arch':<14}{'norm':<8}{'mode':<34}{'batch':>6}{'img/s':>10}{'peak GiB':>10}"
              f"{'ratio':>8}{'cpu ratio':>10}")
    out += [header, "-" * len(header)]
    for r in report["results"]:
        if r.get("img_per_s") is None:
            out.append(f"{r['arch']:<14}{r['norm']:<8}{r['mode']:<34}  {r.get('error', '')[:60]}")
            continue
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "n/a"
        ratio = f"{r['ratio_to_nonprivate']:.2f}" if r.get("ratio_to_nonprivate") else "n/a"
        cpu = r.get("cpu_time_ratio_to_nonprivate")
        out.append(f"{r['arch']:<14}{r['norm']:<8}{r['mode']:<34}{r['batch']:>6}"
                   f"{r['img_per_s']:>10.2f}{peak:>10}{ratio:>8}{f'{cpu:.2f}' if cpu else '':>10}")
    for r in report.get("memory", []):
        if r.get("per_sample_bytes") is None:
            out.append(f"memory {r['arch']}/{r['norm']}/{r['mode']}: {r.get('error', '')[:80]}")
            continue
        ratio = r.get("per_sample_ratio_to_nonprivate")
        out.append(f"memory {r['arch']}/{r['norm']}/{r['mode']}: "
                   f"{r['per_sample_bytes'] / GIB:.3f} GiB per sample"
                   f"{f' ({ratio:.2f}x non-private)' if ratio else ''}, fixed "
                   f"{r['fixed_bytes'] / GIB:.2f} GiB, largest batch in "
                   f"{r['budget_bytes'] / 1e9:g} GB: {r['max_batch_in_budget']}")
    for c in report["checks"]:
        if "error" in c:
            out.append(f"check {c['arch']}/{c['norm']}: {c['error']}")
        else:
            out.append(f"check {c['arch']}/{c['norm']}: bk vs Opacus hooks, norms rel err "
                       f"{c['norm_rel_err']:.1e}, clipped-gradient rel err "
                       f"{c['grad_rel_err_max']:.1e}")
    return out
