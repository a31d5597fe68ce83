"""``patchdp train`` / ``evaluate`` / ``plot``: the training application (segmentation and
classification: the config's ``task``).

Every input is checked before anything is built (the whole config with its overrides, the
device, the checkpoint file, the run folders); a bad one is a :class:`UsageError`: one line
naming the flag or config key, exit code 2.  Heavy imports (torch, opacus, smp, matplotlib)
happen inside the handlers.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from patchdp_opacus.commands import HelpFormatter, UsageError, int_type


_positive_int = int_type(1, "a count")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", formatter_class=HelpFormatter,
        help="train a segmentation or classification model with patch-level DP-SGD",
        description="Train with DP-SGD (the config's task: segmentation or classification). "
                    "The noise is calibrated for --epsilon with the chosen accounting (patch "
                    "level, or the record-level baseline: the same training algorithm, a "
                    "different analysis; or the Gaussian-noise-augmentation baseline, whose "
                    "noise the loader then adds; 'none' trains without DP). Resumes from "
                    "OUTPUT/checkpoint.pt under the same accounting. Any "
                    "config key can be overridden with --set KEY=VALUE (dotted key, YAML value: "
                    "--set training.lr=0.1 --set privacy.crop=[505,505]); the flags below are "
                    "shortcuts for common keys, and --set is applied after them.")
    add_config_arguments(p)
    p.add_argument("--epsilon", type=float, help="target epsilon (nats): privacy.epsilon")
    p.add_argument("--accounting", choices=("patch", "record", "gaussian_augmentation", "none"),
                   help="analysis used to calibrate the noise: privacy.accounting")
    p.add_argument("--sigma-aug", type=float, metavar="SIGMA",
                   help="std (pixel units 0-255) of the Gaussian noise the loader adds to every "
                        "sample: privacy.sigma_aug (with --accounting gaussian_augmentation)")
    p.add_argument("--noise-multiplier", type=float,
                   help="fixed noise multiplier z (std = z*C) instead of calibrating for epsilon")
    p.add_argument("--seed", type=int,
                   help="seed of the model initialisation: training.seed (noise, batches and "
                        "crops come from OS entropy unless privacy.reproducible_noise / "
                        "privacy.reproducible_sampling)")
    p.add_argument("--epochs", type=int, help="training.epochs")
    p.add_argument("--max-steps", type=int, help="stop after this many logical steps")
    p.add_argument("--device", help="cpu, cuda, cuda:1 or auto: training.device")
    p.add_argument("--output", help="run folder (default runs/<name>/<accounting>_eps<E>_seed<S>;"
                                    " gaussian_augmentation_sigma<A>_eps<E>_seed<S>)")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true",
                   help="print the final metrics as one JSON object (progress and logs go to "
                        "stderr)")
    p.set_defaults(handler=cmd_train, unknown_hint=_config_key_hint)

    e = subparsers.add_parser("evaluate", formatter_class=HelpFormatter,
                              help="mIoU / top-1 accuracy and per-class numbers of a checkpoint",
                              description="Evaluate a checkpoint written by 'patchdp train' on "
                                          "whole (full-resolution) images: pixel accuracy, mIoU "
                                          "and per-class IoU for segmentation; top-1, mean and "
                                          "per-class accuracy for classification (a loader-"
                                          "owned resize is applied as in training).")
    e.add_argument("--checkpoint", required=True, help="checkpoint.pt of a run")
    e.add_argument("--data", help="dataset root (default: the run's config)")
    e.add_argument("--split", default="val", help="dataset split (e.g. val, test)")
    e.add_argument("--confusion-matrix", action="store_true",
                   help="also print (with --json: return) the confusion matrix")
    e.add_argument("--max-images", type=_positive_int, help="evaluate only the first N images")
    e.add_argument("--device", default="auto", help="cpu, cuda or auto")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(handler=cmd_evaluate)

    pl = subparsers.add_parser("plot", formatter_class=HelpFormatter,
                               help="mIoU / accuracy vs epsilon, per accounting (mean ± std "
                                    "over seeds)",
                               description="Plot runs written by 'patchdp train' (paper Fig. 5, "
                                           "11-14): mIoU (segmentation) or top-1 accuracy "
                                           "(classification) against the target epsilon, one "
                                           "curve per accounting (patch, record, Gaussian "
                                           "augmentation), mean ± std over seeds.")
    pl.add_argument("runs", nargs="+", help="run folders (or folders containing them)")
    pl.add_argument("--out", required=True, help="output figure (.png/.pdf/.svg)")
    pl.add_argument("--json", action="store_true", help="print the aggregated points as JSON")
    pl.set_defaults(handler=cmd_plot)


# --------------------------------------------------------------------------- config

def _config_key_hint(unknown: list[str]):
    """For ``--lr 0.1`` or ``training.lr=0.1``: the ``--set`` spelling of that config key."""
    from patchdp_opacus.app.config import known_keys

    for i, arg in enumerate(unknown):
        name, _, value = arg.lstrip("-").partition("=")
        name = name.replace("-", "_")
        if not value and arg.startswith("--") and i + 1 < len(unknown) \
                and not unknown[i + 1].startswith("-"):
            value = unknown[i + 1]
        keys = [k for k in known_keys() if k == name or k.rsplit(".", 1)[-1] == name]
        if len(keys) == 1:
            return f"to override a config key use --set {keys[0]}={value or 'VALUE'}"
    return None


def _overrides(args) -> list[tuple[str, object, str]]:
    """``(dotted key, value, what the user typed)`` for the shortcut flags, then ``--set``."""
    from patchdp_opacus.app.config import ConfigError, parse_override

    if args.epsilon is not None and args.noise_multiplier is not None:
        raise UsageError("use either --epsilon (calibrate the noise) or --noise-multiplier")
    items = []
    if args.epsilon is not None:
        items += [("privacy.epsilon", args.epsilon, f"--epsilon {args.epsilon:g}"),
                  ("privacy.noise_multiplier", None, f"--epsilon {args.epsilon:g}")]
    if args.noise_multiplier is not None:
        text = f"--noise-multiplier {args.noise_multiplier:g}"
        items += [("privacy.noise_multiplier", args.noise_multiplier, text),
                  ("privacy.epsilon", None, text)]
    for flag, key in (("accounting", "privacy.accounting"), ("sigma_aug", "privacy.sigma_aug"),
                      ("seed", "training.seed"),
                      ("epochs", "training.epochs"), ("max_steps", "training.max_steps"),
                      ("device", "training.device"), ("data_root", "dataset.root")):
        value = getattr(args, flag)
        if value is not None:
            items.append((key, value, f"--{flag.replace('_', '-')} {value}"))
    for text in args.overrides or []:
        try:
            key, value = parse_override(text)
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
        items.append((key, value, f"--set {text}"))
    return items


def _config_error(args, exc, items) -> UsageError:
    """One line naming the setting: the flag that set the key, else the config file."""
    def related(key):
        return exc.key is not None and (key == exc.key or key.startswith(exc.key + ".")
                                        or exc.key.startswith(key + "."))

    origin = next((typed for key, _, typed in reversed(items) if related(key)), None)
    return UsageError(f"{origin or '--config ' + args.config}: {exc}")


def add_config_arguments(p) -> None:
    """``--config``, ``--set KEY=VALUE`` and ``--data-root``: what :func:`_load_cfg` reads."""
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. training.epochs=3")
    p.add_argument("--data-root", help="dataset.root")


def _load_cfg(args):
    from patchdp_opacus.app.config import ConfigError, load_config

    items = _overrides(args)
    try:
        cfg = load_config(args.config, [(key, value) for key, value, _ in items])
    except FileNotFoundError as exc:
        raise UsageError(f"--config {args.config}: {exc}") from None
    except ConfigError as exc:
        raise _config_error(args, exc, items) from None
    return cfg, items


# --------------------------------------------------------------------------- train

class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (not at set-up)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _repeated_in_the_next_record(record: logging.LogRecord) -> bool:
    """The compatibility helper logs the frozen-parameter list, then its report, which lists
    them again: print the list once (in the report)."""
    return record.name.endswith("plugin.compat") and str(record.msg).startswith("froze ")


def _setup_logging() -> None:
    """Show the library's INFO messages (epoch summaries, calibration) on stderr, once each,
    and hide the torch warning every Opacus step triggers because image inputs need no
    gradient."""
    import warnings

    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    handler.addFilter(lambda record: not _repeated_in_the_next_record(record))
    log = logging.getLogger("patchdp_opacus")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # a dependency configures the root logger too: print once
    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are "
                                              "computed with respect to module outputs")


class _Bars:
    """Progress bars of ``patchdp train`` (stderr): one line per epoch that stays on screen,
    counting logical DP-SGD steps, with the run's epsilon after the epochs so far."""

    def __init__(self):
        self.bar = None
        self.epsilon = "epsilon: after the first epoch"
        self.before = 0

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=steps, desc=f"epoch {epoch}/{epochs}", unit="step", leave=True,
                        file=sys.stderr, dynamic_ncols=True,
                        bar_format="{desc}: {bar:20} {n_fmt}/{total_fmt} logical steps "
                                   "[{elapsed}<{remaining}]{postfix}")
        self.bar.set_postfix_str(self.epsilon)

    def step(self, done: int) -> None:
        self.bar.update(done - self.bar.n)

    def end_epoch(self, row: dict) -> None:
        from patchdp_opacus.app.outputs import fmt

        if row.get("epsilon_patch") is None and row.get("epsilon_record") is None:
            self.epsilon = f"run step {row['steps']}, non-private"
        else:
            self.epsilon = (f"run step {row['steps']}, epsilon patch "
                            f"{fmt(row['epsilon_patch'])} / record {fmt(row['epsilon_record'])}")
        if "epsilon_gaussian_augmentation" in row:
            self.epsilon += f" / Gaussian aug. {fmt(row['epsilon_gaussian_augmentation'])}"
        for key, label in (("miou", "mIoU"), ("accuracy", "accuracy")):
            if row.get(key) is not None:
                self.epsilon += f", {label} {fmt(row[key], '.3f')}"
        self.bar.set_postfix_str(self.epsilon)
        self.bar.close()


def default_output(cfg) -> Path:
    from patchdp_opacus.app.runs import run_name

    p = cfg.privacy
    return Path("runs") / cfg.name / run_name(p.accounting, p.epsilon, p.noise_multiplier,
                                              cfg.training.seed, p.sigma_aug)


def _check_device(name: str, flag: str):
    from patchdp_opacus.app.config import ConfigError
    from patchdp_opacus.app.loop import resolve_device

    try:
        return resolve_device(name)
    except ConfigError as exc:
        raise UsageError(f"{flag}: {exc.detail}") from None


def cmd_train(args) -> int:
    cfg, items = _load_cfg(args)
    flag = next((typed for key, _, typed in items if key == "training.device"), None)
    _check_device(cfg.training.device, flag or f"--config {args.config}: training.device "
                                               f"{cfg.training.device}")
    out = Path(args.output) if args.output else default_output(cfg)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {out} is a file, not a folder")
    from patchdp_opacus.app.config import ConfigError
    from patchdp_opacus.app.loop import train
    from patchdp_opacus.app.outputs import dumps, fmt, segments_text
    from patchdp_opacus.app.tasks import task_of

    _setup_logging()
    existed = out.exists()
    try:
        final = train(cfg, out, resume=not args.no_resume, progress=None if args.quiet
                      else _Bars(), overrides=list(dict.fromkeys(typed for _, _, typed in items)))
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise UsageError(f"data: {exc} (set dataset.root in --config or --data-root)") from None
    except ConfigError as exc:
        raise _config_error(args, exc, items) from None
    except ValueError as exc:  # geometry, data or configuration the analysis cannot accept
        raise UsageError(f"--config {args.config}: {exc}") from None
    finally:
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a failed run leaves no empty folder behind
    if "rank" in final:  # a non-zero torchrun rank: rank 0 reports
        return 0
    if args.json:
        print(dumps(final))
        return 0
    print(f"run folder: {out}")
    if final["accounting"] == "none":
        print(f"steps {final['steps']}, non-private training (no clipping, no noise): no "
              f"privacy claim")
    else:
        target = (f"noise calibrated for {final['accounting']}-level epsilon "
                  f"{final['target_epsilon']:g}" if final["target_epsilon"] is not None
                  else "fixed noise multiplier")
        print(f"steps {final['steps']}, noise multiplier "
              f"{segments_text(final['history_segments'])}, delta = {final['delta']:.3g}, "
              f"{target}")
        print(f"epsilon  patch level: {fmt(final['epsilon_patch'])}   "
              f"record level: {fmt(final['epsilon_record'])}" + (
                  f"   Gaussian augmentation (sigma_aug {final['sigma_aug']:g}, TV "
                  f"{final['augmentation_tv']:.4g}): "
                  f"{fmt(final['epsilon_gaussian_augmentation'])}"
                  if "epsilon_gaussian_augmentation" in final else ""))
    for line in task_of(cfg).summary_lines(final):
        print(line)
    if final.get("stopped"):
        print(final["stopped"])
    return 0


# --------------------------------------------------------------------------- evaluate

def _read_checkpoint(path: Path) -> dict:
    import torch

    if not path.is_file():
        raise UsageError(f"--checkpoint {path} does not exist")
    try:  # weights_only: plain tensors and containers, no code from the file is run
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise UsageError(f"--checkpoint {path} is not a checkpoint written by 'patchdp train' "
                         f"({type(exc).__name__})") from None
    if not isinstance(state, dict) or "config" not in state or "module_state_dict" not in state:
        raise UsageError(f"--checkpoint {path} was not written by 'patchdp train' (no config "
                         f"or model weights in it)")
    return state


def cmd_evaluate(args) -> int:
    path = Path(args.checkpoint)
    state = _read_checkpoint(path)
    device = _check_device(args.device, f"--device {args.device}")
    from patchdp_opacus.app.config import ConfigError, config_from_dict
    from patchdp_opacus.app.loop import evaluation_dataset
    from patchdp_opacus.app.outputs import dumps
    from patchdp_opacus.app.tasks import task_of

    try:
        cfg = config_from_dict(state["config"])
    except ConfigError as exc:
        raise UsageError(f"--checkpoint {path}: its config: {exc}") from None
    if args.data:
        cfg.dataset.root = args.data
    task = task_of(cfg)
    split_kw = {**cfg.dataset.val, "split": args.split}
    try:
        dataset = evaluation_dataset(task.build_dataset(cfg.dataset.name, cfg.dataset.root,
                                                        **split_kw), cfg)
    except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
        raise UsageError(f"data: {exc} (set --data)") from None
    sizes = sorted(getattr(dataset, "image_sizes", ()))
    size = tuple(cfg.privacy.crop) if cfg.privacy.crop is not None else sizes[0]
    model, _ = task.build_model(cfg, size)
    weights = {k[len("_module."):] if k.startswith("_module.") else k: v
               for k, v in state["module_state_dict"].items()}
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise UsageError(f"--checkpoint {path}: its weights do not fit its config "
                         f"({str(exc).splitlines()[0]})") from None
    result = task.evaluate(model.to(device), dataset, cfg, device, max_images=args.max_images,
                           confusion_matrix=args.confusion_matrix)
    final = task.final_metrics(result, dataset, cfg)
    if args.json:
        print(dumps({**final, "num_images": result["num_images"], "checkpoint": str(path),
                     "split": args.split}))
        return 0
    print(f"images {result['num_images']} ({args.split})")
    for line in task.summary_lines({**final, "num_images": result["num_images"]}):
        print(line)
    if args.confusion_matrix:
        matrix = final["confusion_matrix"]
        rows = matrix["rows_true_columns_predicted"]
        width = len(str(max(max(r) for r in rows)))
        print("confusion matrix (rows: true class, columns: predicted), classes in order:",
              ", ".join(matrix["classes"]))
        for row in rows:
            print("  " + " ".join(f"{v:>{width}}" for v in row))
    return 0


# --------------------------------------------------------------------------- plot

#: Final-metrics key of each task's headline metric, and its axis label.
HEADLINES = {"miou": "validation mIoU", "accuracy": "top-1 accuracy (whole images)"}
#: The accountings ``patchdp plot`` draws, in order, with their legend labels.
CURVES = (("patch", "patch-level accounting"),
          ("record", "record-level accounting (DP-SGD)"),
          ("gaussian_augmentation", "Gaussian noise augmentation (w = q·TV)"))


def _run_dirs(paths):
    from patchdp_opacus.app.outputs import FINAL_JSON

    found = []
    for p in map(Path, paths):
        if (p / FINAL_JSON).is_file():
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(f.parent for f in p.rglob(FINAL_JSON)))
        else:
            raise UsageError(f"run folder {p} does not exist")
    if not found:
        raise UsageError(f"no {FINAL_JSON} found under {' '.join(paths)}; run 'patchdp train' first")
    return found


def _read_final(run: Path) -> dict:
    from patchdp_opacus.app.outputs import FINAL_JSON

    path = run / FINAL_JSON
    try:
        final = json.loads(path.read_text())
        if not isinstance(final, dict):
            raise ValueError("not a JSON object")
        for key in ("accounting", "target_epsilon"):
            final[key]  # noqa: B018 - presence check
        if not any(key in final for key in HEADLINES):
            raise KeyError(" or ".join(HEADLINES))
    except (ValueError, KeyError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not a final_metrics.json written by 'patchdp train' "
                         f"({type(exc).__name__}: {exc})") from None
    return final


def cmd_plot(args) -> int:
    from patchdp_opacus.commands._plot import check_out_path

    out = check_out_path(args.out)
    finals = [_read_final(d) for d in _run_dirs(args.runs)]
    metrics = {next(k for k in HEADLINES if k in f) for f in finals}
    if len(metrics) > 1:
        raise UsageError("the runs mix segmentation (mIoU) and classification (accuracy); plot "
                         "each task's runs separately")
    points = aggregate_runs(finals)
    if not points:
        raise UsageError(f"no run with a target epsilon (runs with a fixed --noise-multiplier "
                         f"or without DP have none) and a {metrics.pop()}")
    plot_runs(points, out)
    if args.json:
        from patchdp_opacus.app.outputs import dumps

        print(dumps(points))
    else:
        print(f"wrote {out} ({len(points)} points from {len(finals)} runs)")
    return 0


def plot_runs(points: list[dict], out: Path) -> None:
    """The headline metric against target epsilon, one curve per accounting (and per
    sigma_aug for the Gaussian augmentation), mean ± std over seeds."""
    from patchdp_opacus.commands._plot import log_axis, new_figure, save, spans_decades

    metric = points[0]["metric"]
    fig, ax = new_figure(f"{HEADLINES[metric]} vs privacy budget: noise calibrated per "
                         f"accounting (mean ± std over seeds)", "target epsilon (nats)",
                         HEADLINES[metric])
    curves = sorted({(r["accounting"], r.get("sigma_aug")) for r in points},
                    key=lambda c: ([a for a, _ in CURVES].index(c[0]) if c[0] in dict(CURVES)
                                   else len(CURVES), c[1] or 0))
    for i, (level, sigma) in enumerate(curves):
        rows = [r for r in points if (r["accounting"], r.get("sigma_aug")) == (level, sigma)]
        x = [r["epsilon"] for r in rows]
        mean = [r["mean"] for r in rows]
        std = [r["std"] for r in rows]
        seeds_text = "/".join(map(str, sorted({r["seeds"] for r in rows})))
        label = dict(CURVES).get(level, level) + (f", σ_aug = {sigma:g}" if sigma else "")
        ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, color=f"C{i}",
                    label=f"{label}, {seeds_text} seed(s) per point")
        ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=f"C{i}", alpha=0.15, linewidth=0)
    xs = [r["epsilon"] for r in points]
    if spans_decades(xs):
        log_axis(ax, "x")
    save(fig, out)


def aggregate_runs(finals) -> list[dict]:
    """Group final metrics by (accounting, sigma_aug, target epsilon): mean and std of the
    headline metric (mIoU or top-1 accuracy) over seeds (runs without a target epsilon or
    without the metric are left out).  Segmentation points keep ``miou_mean`` /
    ``miou_std``."""
    import numpy as np

    groups: dict = {}
    for f in finals:
        metric = next((k for k in HEADLINES if k in f), None)
        if f.get("target_epsilon") is None or metric is None or f.get(metric) is None:
            continue
        key = (metric, f["accounting"], f.get("sigma_aug"), float(f["target_epsilon"]))
        groups.setdefault(key, []).append(f[metric])
    points = []
    for (metric, a, sigma, e), v in sorted(groups.items(), key=lambda kv: (
            kv[0][0], kv[0][1], kv[0][2] or 0, kv[0][3])):
        point = {"accounting": a, "epsilon": e, "metric": metric, "mean": float(np.mean(v)),
                 "std": float(np.std(v)), "seeds": len(v),
                 f"{metric}_mean": float(np.mean(v)), f"{metric}_std": float(np.std(v))}
        if sigma is not None:
            point["sigma_aug"] = sigma
        points.append(point)
    return points
