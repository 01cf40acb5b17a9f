"""`megatron-llama sbatch`: render the SLURM batch script for a preset on a cluster.

One parameterized script (``templates/slurm/llama.sbatch``, also ``examples/slurm/``) serves
every model: rendering fills its #SBATCH header from a `Cluster` and its settings block from
the preset's settings file (``templates/slurm/<preset>.env``: TP, PP, VP, SP, batch sizes,
each explained) plus overrides. The layout is checked first with the same rules `pretrain`
applies (TP x PP x DP = world size, heads divisible by TP, batches divisible, ...) and a few
of a cluster's own (TP inside a node, a time limit longer than the signal lead time), so an
impossible run is refused with one line before anything is queued.

The rendered script requeues itself after a signal-triggered checkpoint (see the template's
header); `pretrain` resumes from the latest checkpoint when the job runs again.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from megatron_llama.errors import ConfigError
from megatron_llama.model.presets import get_preset

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates" / "slurm"
TEMPLATE = TEMPLATE_DIR / "llama.sbatch"
INT_KEYS = ("TP", "PP", "MICRO_BATCH", "GLOBAL_BATCH", "SEQ_LENGTH", "SAVE_INTERVAL",
            "EVAL_INTERVAL", "SIGNAL_SECONDS")
SETTING_KEYS = INT_KEYS + ("VP", "SP", "RECOMPUTE")
# settings a file may leave out (older files; the 7B-65B presets need neither)
OPTIONAL_SETTINGS = {"CP": "1", "ENDS_AS_LAYERS": "0"}
# pretrain flags the script sets itself; refused among the extra pretrain arguments.
OWNED_FLAGS = ("--preset", "--tp", "--pp", "--vp", "--sp", "--micro-batch", "--global-batch",
               "--seq-length", "--train-steps", "--recompute", "--save", "--save-interval",
               "--load", "--eval-interval", "--data", "--tokenizer", "--synthetic",
               "--nproc-per-node", "--cp", "--embedding-and-loss-as-layers")
_SAFE = re.compile(r"^[A-Za-z0-9_.,:+@/=-]+$")  # values that go on #SBATCH lines unquoted
_TIME = re.compile(r"^(?:(\d+)-(\d+)(?::(\d+))?(?::(\d+))?|(\d+)(?::(\d+))?(?::(\d+))?)$")


@dataclass(frozen=True)
class Cluster:
    """Where and how the job runs: the #SBATCH header and the software environment.

    ``gpus_per_node=0`` means CPU nodes (gloo); ``tasks_per_node`` defaults to one task per
    GPU (1 on CPU nodes). ``container`` is an image for pyxis/enroot (``srun
    --container-image``); ``venv`` a virtualenv activated before srun; neither: the
    ``megatron-llama`` on the submitting shell's PATH (sbatch exports the environment).
    """

    nodes: int
    gpus_per_node: int = 8
    tasks_per_node: Optional[int] = None
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time: str = "24:00:00"
    container: Optional[str] = None
    container_mounts: Optional[str] = None
    venv: Optional[str] = None
    run_root: str = "runs"
    job_name: Optional[str] = None
    env: tuple[tuple[str, str], ...] = ()

    @property
    def ntasks_per_node(self) -> int:
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        return self.gpus_per_node if self.gpus_per_node > 0 else 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node


def read_settings(path: Path) -> tuple[dict[str, str], list[str]]:
    """Parse a preset settings file: ``KEY=VALUE  # comment`` lines and ``#`` comments.

    Returns the values and the raw lines (kept to carry the explanations into the script).
    """
    values: dict[str, str] = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        body = line.split("#", 1)[0].strip()
        if not body:
            continue
        key, sep, value = body.partition("=")
        if not sep or (key not in SETTING_KEYS and key not in OPTIONAL_SETTINGS):
            raise ConfigError(f"{path}:{number}: expected KEY=VALUE with KEY in "
                              f"{', '.join(SETTING_KEYS + tuple(OPTIONAL_SETTINGS))}, got "
                              f"{line.strip()!r}")
        values[key] = value.strip()
    missing = [k for k in SETTING_KEYS if k not in values]
    if missing:
        raise ConfigError(f"{path}: missing setting(s) {', '.join(missing)}")
    for key, default in OPTIONAL_SETTINGS.items():
        if key not in values:
            values[key] = default
            lines.append(f"{key}={default}")
    return values, lines


def preset_settings(preset: str) -> tuple[dict[str, str], list[str]]:
    """The cluster settings of a preset: its ``<name>.env`` file, or plain defaults.

    Presets without a file (``tiny``) get no model parallelism, micro batch 1 and the
    preset's global batch.
    """
    p = get_preset(preset)
    path = TEMPLATE_DIR / f"{p.name}.env"
    if path.is_file():
        return read_settings(path)
    seq = p.seq_length
    values = dict(TP="1", PP="1", VP="", SP="0", MICRO_BATCH="1",
                  GLOBAL_BATCH=str(max(1, p.batch_tokens // seq)), SEQ_LENGTH=str(seq),
                  RECOMPUTE="none", SAVE_INTERVAL="1000", EVAL_INTERVAL="0", SIGNAL_SECONDS="120")
    values.update(OPTIONAL_SETTINGS)
    lines = [f"# {p.name}: no settings file; defaults (no model parallelism)"]
    return values, lines + [f"{k}={values[k]}" for k in (*SETTING_KEYS, *OPTIONAL_SETTINGS)]


def apply_overrides(values: dict[str, str], lines: list[str],
                    overrides: dict[str, object]) -> tuple[dict[str, str], list[str]]:
    """Replace settings by the non-None ``overrides`` (keys of SETTING_KEYS), marking them."""
    changed = {}
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in SETTING_KEYS and key not in OPTIONAL_SETTINGS:
            raise ConfigError(f"unknown setting {key}")
        if key in ("SP", "ENDS_AS_LAYERS"):
            value = "1" if value else "0"
        elif key == "VP" and int(value) <= 1:  # type: ignore[arg-type]
            value = ""
        changed[key] = str(value)
    out_values = dict(values, **changed)
    out_lines = []
    for line in lines:
        key = line.split("#", 1)[0].partition("=")[0].strip()
        if key in changed:
            line = f"{key}={changed[key]}  # overridden (preset: {values[key] or 'none'})"
        out_lines.append(line)
    return out_values, out_lines


def _int_setting(values: dict[str, str], key: str) -> int:
    try:
        return int(values[key])
    except ValueError:
        raise ConfigError(f"{key}={values[key]!r} is not an integer") from None


def time_limit_seconds(limit: str) -> int:
    """Seconds in a Slurm time limit: M, M:S, H:M:S, D-H, D-H:M or D-H:M:S."""
    m = _TIME.match(limit)
    if not m:
        raise ConfigError(f"time limit {limit!r} is not M, M:S, H:M:S, D-H, D-H:M or D-H:M:S")
    d, h, mi, s, m1, m2, m3 = (int(x) if x else 0 for x in m.groups())
    if m.group(1) is not None:
        return ((d * 24 + h) * 60 + mi) * 60 + s
    if m.group(7) is not None:
        return (m1 * 60 + m2) * 60 + m3
    return m1 * 60 + m2


def check_run(preset: str, values: dict[str, str], cluster: Cluster,
              train_steps: Optional[int] = None) -> int:
    """Refuse, with one line, a layout or cluster that cannot run; returns the train steps.

    The layout rules are `pretrain`'s own (`TrainConfig.check`); on top: nodes, tasks and
    GPUs positive, one task per GPU, TP inside a node, the signal lead time shorter than
    the time limit, header values without spaces.
    """
    from megatron_llama.parallel import ParallelLayout
    from megatron_llama.training.recipe import TrainConfig

    if cluster.nodes < 1 or cluster.gpus_per_node < 0 or cluster.ntasks_per_node < 1:
        raise ConfigError(f"nodes ({cluster.nodes}) and tasks per node "
                          f"({cluster.ntasks_per_node}) must be positive, GPUs per node "
                          f"({cluster.gpus_per_node}) not negative")
    if cluster.gpus_per_node and cluster.ntasks_per_node != cluster.gpus_per_node:
        raise ConfigError(f"one task per GPU: tasks per node ({cluster.ntasks_per_node}) must "
                          f"equal GPUs per node ({cluster.gpus_per_node})")
    for name in ("partition", "account", "qos", "job_name", "run_root", "container"):
        value = getattr(cluster, name)
        if value is not None and not _SAFE.match(value):
            raise ConfigError(f"{name.replace('_', ' ')} {value!r} has characters a #SBATCH "
                              "line or path cannot hold (spaces, quotes, ...)")
    if cluster.container and cluster.venv:
        raise ConfigError("choose a container or a virtualenv, not both")
    ints = {k: _int_setting(values, k) for k in INT_KEYS}
    for key in ("SP", "ENDS_AS_LAYERS"):
        if values[key] not in ("0", "1"):
            raise ConfigError(f"{key} must be 0 or 1, got {values[key]!r}")
    cp = _int_setting(values, "CP")
    if values["VP"] and not values["VP"].isdigit():
        raise ConfigError(f"VP must be empty or an integer, got {values['VP']!r}")
    if values["RECOMPUTE"] not in ("none", "selective", "full"):
        raise ConfigError(f"RECOMPUTE must be none, selective or full, got {values['RECOMPUTE']!r}")
    tp, tasks = ints["TP"], cluster.ntasks_per_node
    if tp > tasks or tasks % tp:
        raise ConfigError(f"TP={tp} does not fit the {tasks} tasks of a node: tensor "
                          "parallelism must stay inside a node")
    if not 0 < ints["SIGNAL_SECONDS"] <= 65535:
        raise ConfigError(f"signal lead time must be 1..65535 s, got {ints['SIGNAL_SECONDS']}")
    limit = time_limit_seconds(cluster.time)
    if ints["SIGNAL_SECONDS"] >= limit:
        raise ConfigError(f"signal lead time {ints['SIGNAL_SECONDS']} s is not shorter than "
                          f"the time limit {cluster.time} ({limit} s)")
    p = get_preset(preset)
    seq, global_batch = ints["SEQ_LENGTH"], ints["GLOBAL_BATCH"]
    if min(seq, global_batch, ints["MICRO_BATCH"]) < 1:
        raise ConfigError("sequence length, micro and global batch must be positive")
    steps = train_steps if train_steps is not None else max(1, p.train_tokens // (global_batch * seq))
    layout = ParallelLayout(tp=tp, pp=ints["PP"], vp=int(values["VP"]) if values["VP"] else None,
                            sp=values["SP"] == "1", cp=cp,
                            embedding_and_loss_as_layers=values["ENDS_AS_LAYERS"] == "1")
    TrainConfig(model=p.model, layout=layout, seq_length=seq, micro_batch=ints["MICRO_BATCH"],
                global_batch=global_batch, train_steps=steps).check(cluster.world_size)
    return steps


def _fill(template: str, fields: dict[str, str]) -> str:
    """Replace ``{{name}}``; a placeholder alone on its line with an empty value drops the line."""
    out = []
    for line in template.splitlines():
        alone = re.fullmatch(r"\{\{(\w+)\}\}", line.strip())
        if alone and not fields[alone.group(1)]:
            continue
        out.append(re.sub(r"\{\{(\w+)\}\}", lambda m: fields[m.group(1)], line))
    return "\n".join(out) + "\n"


def render_script(preset: str, cluster: Cluster, overrides: Optional[dict] = None, *,
                  data: Optional[str] = None, tokenizer: Optional[str] = None,
                  synthetic: bool = False, checkpoint_dir: Optional[str] = None,
                  train_steps: Optional[int] = None, max_retries: int = 3,
                  extra_args: Sequence[str] = ()) -> tuple[str, dict]:
    """Render the batch script; returns (script text, summary of the checked run).

    ``overrides`` maps setting keys (TP, PP, VP, SP, MICRO_BATCH, ...) to values replacing
    the preset's. Data is ``data`` + ``tokenizer`` (a blend YAML and its SentencePiece
    model) or ``synthetic``. ``extra_args`` are appended to the pretrain command (flags the
    script sets itself are refused). Paths are written as given.
    """
    name = get_preset(preset).name
    values, lines = apply_overrides(*preset_settings(name), overrides or {})
    if synthetic == bool(data) or bool(data) != bool(tokenizer):
        raise ConfigError("pass --data BLEND.yaml with --tokenizer MODEL, or --synthetic")
    for arg in extra_args:
        if arg.split("=", 1)[0] in OWNED_FLAGS:
            raise ConfigError(f"{arg.split('=', 1)[0]} is set by the script itself: "
                              "use the sbatch flag of that name")
    for key, _ in cluster.env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError(f"--env {key!r}: not a variable name")
    steps = check_run(name, values, cluster, train_steps)
    if max_retries < 0:
        raise ConfigError(f"--max-retries must be >= 0, got {max_retries}")
    q = shlex.quote
    options = []
    if cluster.gpus_per_node:
        options += [f"--gpus-per-node={cluster.gpus_per_node}", "--exclusive", "--mem=0"]
    for flag, value in (("partition", cluster.partition), ("account", cluster.account),
                        ("qos", cluster.qos)):
        if value:
            options.append(f"--{flag}={value}")
    tokens = values["GLOBAL_BATCH"] + " x " + values["SEQ_LENGTH"] + " tokens per step"
    settings = [f"PRESET={name}"] + lines + [
        f"TRAIN_STEPS={steps}  # " + ("set explicitly" if train_steps is not None else
                                      f"the preset's tokens / ({tokens})"),
        f"MAX_RETRIES={max_retries}  # requeues after failures in a row at one checkpoint "
        "step (a crash, a hang, a lost node); 0: never",
        f"RUN_ROOT={q(cluster.run_root)}  # per-job folders: RUN_ROOT/<job name>-<job id>/",
        f"CKPT_DIR={q(checkpoint_dir) if checkpoint_dir else ''}  # empty: the job's own "
        "folder; set it to continue another job's checkpoints"]
    if cluster.container:
        mounts = cluster.container_mounts or f"{cluster.run_root}:{cluster.run_root}"
        environment = ["# pyxis/enroot container (megatron_llama installed in the image); "
                       "RUN_ROOT and the data must be mounted",
                       f"SRUN_OPTIONS=(--container-image={q(cluster.container)} "
                       f"--container-mounts={q(mounts)} --container-workdir=\"$PWD\")"]
    elif cluster.venv:
        environment = [f"source {q(cluster.venv)}/bin/activate  # srun passes PATH to every task",
                       "SRUN_OPTIONS=()"]
    else:
        environment = ["SRUN_OPTIONS=()  # megatron-llama from the submitting shell's PATH "
                       "(sbatch exports the environment)"]
    data_args = ["--synthetic"] if synthetic else ["--data", data, "--tokenizer", tokenizer]
    layout_dp = cluster.world_size // (int(values["TP"]) * int(values["PP"]) * int(values["CP"]))
    script = _fill(TEMPLATE.read_text(encoding="utf-8"), {
        "job_name": cluster.job_name or f"llama-{name}", "nodes": str(cluster.nodes),
        "tasks_per_node": str(cluster.ntasks_per_node), "time": cluster.time,
        "signal_seconds": values["SIGNAL_SECONDS"], "run_root": cluster.run_root,
        "sbatch_options": "\n".join(f"#SBATCH {o}" for o in options),
        "settings": "\n".join(settings), "environment": "\n".join(environment),
        "env_exports": "\n".join(f"export {k}={q(v)}" for k, v in cluster.env),
        "data_args": " ".join(q(a) for a in data_args),
        "extra_args": " ".join(q(a) for a in extra_args)})
    summary = dict(preset=name, world_size=cluster.world_size, dp=layout_dp, train_steps=steps,
                   microbatches=int(values["GLOBAL_BATCH"]) // (int(values["MICRO_BATCH"]) * layout_dp),
                   **{k.lower(): values[k] for k in (*SETTING_KEYS, *OPTIONAL_SETTINGS)})
    return script, summary
