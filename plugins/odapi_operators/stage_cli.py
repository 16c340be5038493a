"""`odapi <stage>` and `odapi stage run`, generated from the stage declarations.

Every input of a stage becomes a flag (or a positional argument), every option of its config
section a flag with the section's default and description, so a new option appears on the
command line the moment its field exists. `--pipeline` reads the options from a run's frozen
`pipeline.json` (or a pipeline YAML) and flags override them; without it, the flags and the
section's defaults are all there is.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from functools import partial
from typing import Any, Callable, Literal

from pydantic import BaseModel, ValidationError, create_model
from pydantic.fields import FieldInfo

from odapi_operators.core.config import ConfigError
from odapi_operators.core.stages import catalog
from odapi_operators.core.stages.contract import StageSpec
from odapi_operators.core.wording import flag_words

ALIASES = {"fetch": ["download"]}
_IN, _OPT = "in__", "opt__"


def _pairs(text: str, cast: Callable[[str], Any]) -> dict[str, Any]:
    """'train=0.8,val=0.2' -> {'train': 0.8, 'val': 0.2}"""
    try:
        return {k.strip(): cast(v) for k, v in (item.split("=", 1) for item in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected name=value[,name=value...], got {text!r}")


def _bare(annotation: Any) -> Any:
    """`X | None` -> X."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def flag_name(name: str, info: FieldInfo) -> str:
    return flag_words(info.alias or name)


def _argument(name: str, info: FieldInfo) -> dict[str, Any]:
    """argparse keywords for one model field."""
    kind = _bare(info.annotation)
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is bool:
        spec: dict[str, Any] = {"action": argparse.BooleanOptionalAction}
    elif kind in (int, float, str):
        spec = {"type": kind}
    elif origin is Literal:
        spec = {"choices": list(args), "type": type(args[0])}
    elif origin is list and args and args[0] in (str, int, float):
        spec = {"nargs": "+", "type": args[0]}
    elif origin is tuple and args and all(a in (int, float) for a in args):
        spec = {"nargs": len(args), "type": args[0]}
    elif origin is dict and len(args) == 2 and args[1] in (str, int, float):
        spec = {"type": partial(_pairs, cast=args[1]), "metavar": "NAME=VALUE,..."}
    else:
        spec = {"type": json.loads, "metavar": "JSON"}
    text = info.description or ""
    if not info.is_required() and info.default not in (None, [], {}):
        text += f" (default: {info.default})".replace("%", "%%")
    spec["help"] = text.strip() or None
    return spec


def add_fields(parser: argparse._ActionsContainer, fields: dict[str, FieldInfo], prefix: str,
               required_inputs: bool = False) -> None:
    """A flag per field; `dest` is prefix + field name, unset flags stay None. Options that
    are whole sections (train.placement) stay in the YAML; inputs of a model type take JSON."""
    for name, info in fields.items():
        kind = _bare(info.annotation)
        if prefix != _IN and isinstance(kind, type) and issubclass(kind, BaseModel):
            continue
        spec = _argument(name, info)
        if "choices" not in spec and "action" not in spec:
            spec.setdefault("metavar", (info.alias or name).upper())
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if extra.get("positional"):
            spec["nargs"] = "+" if spec.get("nargs") == "+" else None
            parser.add_argument(prefix + name, **spec)
            continue
        parser.add_argument(flag_name(name, info), dest=prefix + name, default=None,
                            required=required_inputs and info.is_required(), **spec)


def given(args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    return {key[len(prefix):]: value for key, value in vars(args).items()
            if key.startswith(prefix) and value is not None}


def _cli_words(error: ValidationError, fields: dict[str, FieldInfo]) -> str:
    """A pydantic error in the words of the command line: flags, not field paths."""
    lines = []
    for item in error.errors():
        name = str(item["loc"][0]) if item["loc"] else ""
        info = fields.get(name) or next((f for n, f in fields.items() if f.alias == name), None)
        where = flag_name(name, info) if info else (name or "options")
        lines.append(f"{where}: {item['msg']} (got {item.get('input')!r})")
    return "; ".join(lines)


def without_home_paths(section: str, fields: dict[str, FieldInfo],
                       flags: dict[str, Any]) -> dict[str, Any]:
    """Flags plus None for optional path options not given: their defaults are relative to a
    pipeline's home (`var/records-cache`), which a bare command does not have."""
    from odapi_operators.core.config import PATH_KEYS

    unset = {name: None for name, info in fields.items()
             if f"{section}.{info.alias or name}" in PATH_KEYS and not info.is_required()
             and info.default is not None and _bare(info.annotation) != info.annotation
             and name not in flags}  # only optional ones: `records.cache`, not `pool`
    return {**unset, **flags}


def build_options(spec: StageSpec, pipeline: Any, flags: dict[str, Any]) -> BaseModel | None:
    """The stage's options: the pipeline's section (if any) overridden by `flags`.

    Without a pipeline only the fields this stage uses are validated (from the same field
    definitions); the others keep their defaults.
    """
    model = spec.options
    if model is None:
        return None
    own = spec.option_fields()
    data = {(own[name].alias or name): value for name, value in flags.items()}
    try:
        if pipeline is not None:
            section = getattr(pipeline, spec.section).model_dump(by_alias=True)
            return model.model_validate({**section, **data})
        subset = create_model(f"{model.__name__}For{spec.name.title()}",
                              __config__=model.model_config,
                              **{name: (info.annotation, info) for name, info in own.items()})
        checked = subset.model_validate(without_home_paths(spec.section, own, data))
        return model.model_construct(**{(own[n].alias or n): getattr(checked, n) for n in own})
    except ValidationError as exc:
        raise ConfigError(_cli_words(exc, own)) from None


def progress_output() -> dict[str, Any]:
    """A bar on a terminal; otherwise a log line on stderr at a steady cadence."""
    if sys.stderr.isatty():
        return {"bar": True}
    return {"log": lambda line: print(line, file=sys.stderr, flush=True)}


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_command(spec: StageSpec, args: argparse.Namespace) -> dict:
    from odapi_operators.core.stages.runner import load_pipeline, run_stage

    if spec.folder is not None and not args.out and not (args.pipeline and args.run_id):
        args.usage_error("give --out, or --pipeline and --run-id (the run's folder)")
    pipeline = load_pipeline(args.pipeline) if args.pipeline else None
    inputs = given(args, _IN)
    try:
        spec.inputs.model_validate(inputs)
    except ValidationError as exc:
        raise ConfigError(_cli_words(exc, spec.inputs.model_fields)) from None
    options = build_options(spec, pipeline, given(args, _OPT))
    result = run_stage(spec.name, pipeline=pipeline, run_id=args.run_id, inputs=inputs,
                       options=options, out=args.out, log=_log,
                       progress={} if args.no_progress else progress_output())
    return result.model_dump(mode="json")


def add_stage_commands(sub: argparse._SubParsersAction) -> None:
    """`odapi <stage>` for every declared stage."""
    for spec in catalog.stages().values():
        p = sub.add_parser(spec.name.replace("_", "-"), help=spec.help, description=spec.help,
                           aliases=ALIASES.get(spec.name, []))
        add_fields(p.add_argument_group("inputs"), spec.inputs.model_fields, _IN,
                   required_inputs=True)
        if spec.section:
            add_fields(p.add_argument_group(f"options (pipeline config `{spec.section}:`)"),
                       spec.option_fields(), _OPT)
        where = p.add_argument_group("run")
        where.add_argument("--pipeline", help="a run's frozen pipeline.json, or a pipeline "
                                              "YAML: options (flags override them)")
        where.add_argument("--run-id", help="with --pipeline: the run whose folders to use")
        where.add_argument("--out", help="output folder (default: the run's folder for this "
                                         "stage, from --pipeline and --run-id)")
        where.add_argument("--no-progress", action="store_true")
        p.set_defaults(func=partial(run_command, spec), usage_error=p.error)


def run_generic(args: argparse.Namespace) -> dict:
    """`odapi stage run`: what operators, child processes and pods run."""
    from odapi_operators.core import storage
    from odapi_operators.core.stages.runner import decode_inputs, run_stage

    spec = catalog.get(args.stage)
    inputs = json.loads(args.inputs) if args.inputs else {}
    inputs.update(decode_inputs(spec, [tuple(pair) for pair in args.input or []]))
    result = run_stage(spec.name, pipeline=args.pipeline, run_id=args.run_id, inputs=inputs,
                       out=args.out, log=_log)
    summary = result.model_dump(mode="json")
    if args.result_file:
        storage.write_text(args.result_file, json.dumps(summary, sort_keys=True))
    _log(result.log_line())
    return summary


def list_stages(args: argparse.Namespace) -> None:
    for spec in catalog.stages().values():
        print(f"{spec.name:<20} {spec.process:<6} section={spec.section or '-':<12} "
              f"inputs={','.join(spec.inputs.model_fields) or '-'} "
              f"result={','.join(spec.result.model_fields)}")


def add_generic_command(sub: argparse._SubParsersAction) -> None:
    about = "run any declared stage for one run (what operators, children and pods run)"
    stage = sub.add_parser("stage", help=about, description=about)
    actions = stage.add_subparsers(dest="stage_command", required=True, metavar="ACTION")
    p = actions.add_parser("run", help="run STAGE for a run of a frozen pipeline config")
    p.add_argument("stage", metavar="STAGE", choices=list(catalog.stages()))
    p.add_argument("--pipeline", required=True, help="the run's frozen pipeline.json")
    p.add_argument("--run-id", required=True)
    p.add_argument("--inputs", help="inputs as one JSON object")
    p.add_argument("--input", nargs=2, action="append", metavar=("NAME", "VALUE"),
                   help="one input (JSON unless the input is text); repeatable")
    p.add_argument("--out", help="output folder instead of the run layout's")
    p.add_argument("--result-file", help="also write the result here (atomically)")
    p.set_defaults(func=run_generic)
    p = actions.add_parser("list", help="every declared stage: inputs, options, result")
    p.set_defaults(func=list_stages)
