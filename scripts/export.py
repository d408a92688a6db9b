"""Export a classification network for deployment (ONNX, TorchScript or torch.export's ExportedProgram),
then check the written file against PyTorch on random inputs at two batch sizes.

    python scripts/export.py RUN/checkpoints/best.pt --format onnx --out model.onnx [--opset 20]
    python scripts/export.py RUN/checkpoints/best.pt --format torchscript --out model.ts
    python scripts/export.py RUN/checkpoints/best.pt --format exported-program --out model.pt2
    python scripts/export.py --model ps_resnet50 --format onnx --out ps_resnet50.onnx  # random weights
    python scripts/export.py weights.pt --model resnet50 --conv psconv --format onnx --out m.onnx  # bare

CHECKPOINT is one of our classification checkpoints (its stored config names the network, conv type and
image size) or, with `--model NAME [--conv TYPE]`, a bare state dict; `--model` alone exports a randomly
initialised network. The batch dimension is dynamic; height and width are those of the checkpoint's
data.image_size (or `--image-size`). The file is written only once the check passed: the exported model run
by its own runtime (onnxruntime's CPU provider for ONNX, torch.jit.load, torch.export.load) at batch sizes
1 and 3 must match the eager model within `--tolerance` x max(1, max |logit|) (max abs difference printed).

ONNX needs the export extra: pip install -e .[export] (onnx, onnxscript, onnxruntime). docs/export.md
lists what exports per format and conv type, the known limitations and the onnxruntime latency.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import logging
import os
import re
import secrets
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from polyscale.cli.common import report_user_errors
from polyscale.engine.checkpoint import (
    is_polyscale_checkpoint,
    load_checkpoint,
    model_state,
    stored_config,
    trained_as,
)
from polyscale.errors import CheckpointError, ConfigError, PolyscaleError, one_line
from polyscale.models import create_model, get_model_spec, load_model_weights, read_state_dict
from polyscale.ops import CONV_TYPES, PSConv2d, psconv_impls
from polyscale.ops.dynamic_psconv import convert_to_static
from polyscale.tasks.arguments import MODEL_KEYS, config_keys, model_arguments

FORMATS = ("onnx", "torchscript", "exported-program")
CHECK_BATCHES = (1, 3)  # neither is the batch of the example input (2): the batch must really be dynamic
EXAMPLE_BATCH = 2  # torch.export specialises sizes 0 and 1, so the example batch is 2
INSTALL_HINT = "Install the export extra: pip install -e .[export] (or pip install 'polyscale[export]')."
ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")


class ExportError(PolyscaleError):
    """A network that cannot be exported in the asked format, or whose export differs from PyTorch."""


@dataclass
class Network:
    """The eval-mode network to export and what the messages say about it."""

    model: nn.Module
    name: str
    conv: str
    image_size: int
    source: str  # the checkpoint path, or "random initialisation"
    num_classes: int


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", nargs="?", type=Path, help="best.pt / last.pt of a classification run")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, type=Path, help="file to write (.onnx, .ts, .pt2)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: torch.onnx's, 20)")
    p.add_argument(
        "--model", help="registered network: without CHECKPOINT random weights, with one a bare state dict"
    )
    p.add_argument("--conv", choices=CONV_TYPES, help="conv type for --model (default: the name's own)")
    p.add_argument("--num-classes", type=int, help="--model without CHECKPOINT: classifier outputs")
    p.add_argument(
        "--image-size", type=int, help="input height = width (default: the checkpoint's data.image_size)"
    )
    p.add_argument("--ema", action="store_true", help="export the checkpoint's EMA weights")
    p.add_argument("--tolerance", type=float, default=1e-4, help="allowed max abs diff / max(1, max |logit|)")
    p.add_argument("--seed", type=int, default=0, help="random weights (--model) and check inputs")
    p.add_argument("--json", type=Path, help="also write the summary (sizes, diffs, timings) here")
    return p.parse_args(argv)


# ---- the network ---------------------------------------------------------------------------------------


def _classes_in(weights: dict[str, Tensor]) -> int | None:
    fc = weights.get("fc.weight")
    return int(fc.shape[0]) if isinstance(fc, Tensor) and fc.dim() == 2 else None


def _detection_error(path: Path, what: str) -> ExportError:
    return ExportError(
        f"{path} is {what}. scripts/export.py exports classification networks only: detection export is not "
        "supported (torchvision's detectors resize, batch and post-process images with data-dependent "
        "shapes and NMS). Export the classification checkpoint of the backbone instead."
    )


# create_model's argument names -> this command's options, for its error messages
_OPTIONS = {"name": "--model", "conv": "--conv", "num_classes": "--num-classes"}


def load_network(args: argparse.Namespace) -> Network:
    """The network of `args` (checkpoint, bare state dict + --model, or --model alone), in eval mode."""
    if args.checkpoint is None:
        if not args.model:
            raise ConfigError(
                "Nothing to export: give a checkpoint (python scripts/export.py RUN/checkpoints/best.pt "
                "--format onnx --out model.onnx) or a registered network (--model NAME [--conv TYPE])."
            )
        torch.manual_seed(args.seed)
        with config_keys(_OPTIONS):
            spec = get_model_spec(args.model)
            classes = args.num_classes or spec.paper_classes
            model = create_model(args.model, num_classes=classes, conv=args.conv)
        size = args.image_size or spec.input_size
        return _network(model, args.model, size, "random initialisation", classes)
    if args.num_classes is not None:
        raise ConfigError("--num-classes is for --model without a checkpoint; a checkpoint brings its own.")
    ckpt = load_checkpoint(args.checkpoint)
    if is_polyscale_checkpoint(ckpt):
        return _from_container(ckpt, args)
    if args.ema:
        raise ConfigError(f"--ema needs a polyscale checkpoint; {args.checkpoint} is a bare state dict.")
    weights = read_state_dict(ckpt, name=str(args.checkpoint)).state_dict
    if any(key.startswith(("backbone.", "roi_heads.", "rpn.")) for key in weights):
        raise _detection_error(args.checkpoint, "a detector's state dict")
    if not args.model:
        raise ConfigError(
            f"{args.checkpoint} is a bare state dict with no stored config, so the network is unknown. Name "
            "it: python scripts/export.py CHECKPOINT --model NAME [--conv TYPE] --format ... --out ..."
        )
    with config_keys(_OPTIONS):
        spec = get_model_spec(args.model)
        classes = _classes_in(weights) or spec.paper_classes
        model = create_model(args.model, num_classes=classes, conv=args.conv)
    fix = "Fix: name the network the file was made for (--model NAME --conv TYPE)."
    load_model_weights(model, ckpt, strict=True, name=str(args.checkpoint), fix=fix)
    return _network(model, args.model, args.image_size or spec.input_size, str(args.checkpoint), classes)


def _from_container(ckpt: dict[str, Any], args: argparse.Namespace) -> Network:
    """Our checkpoint: the network its stored config names, with its (or its EMA) weights."""
    path, config = args.checkpoint, stored_config(ckpt)
    task = (config.get("task") or {}).get("name", "classification")
    if task != "classification":
        raise _detection_error(path, f"a checkpoint of task={task}")
    if not isinstance(config.get("model"), dict) or not config["model"].get("name"):
        raise CheckpointError(
            f"{path} stores no model config, so the network is unknown; it was not written by a training run "
            "of this polyscale. Export its weights as a bare state dict with --model NAME [--conv TYPE]."
        )
    if args.model or args.conv:
        raise ConfigError(
            f"{path} was trained as {trained_as(ckpt)} and exports as that network; --model / --conv are for "
            "bare state dicts and random networks. Drop them."
        )
    try:
        weights = model_state(ckpt, use_ema=args.ema, source=path)
    except CheckpointError as err:
        if not args.ema:
            raise
        raise CheckpointError(
            f"{path} has no EMA weights: the run that wrote it trained with trainer.ema=false. Export its "
            "main weights (drop --ema)."
        ) from err
    data = config.get("data") or {}
    classes = _classes_in(weights) or config["model"].get("num_classes") or data.get("num_classes") or 1000
    with config_keys(MODEL_KEYS):
        kwargs = model_arguments({**config["model"], "checkpoint_path": None}, classes)
        model = create_model(**kwargs)
    fix = "Fix: the checkpoint's stored config and weights disagree; export its weights with --model NAME."
    load_model_weights(model, weights, strict=True, name=str(path), trained_as=trained_as(ckpt), fix=fix)
    size = args.image_size or data.get("image_size") or get_model_spec(kwargs["name"]).input_size
    return _network(
        model, kwargs["name"], int(size), str(path) + (" (EMA weights)" if args.ema else ""), classes
    )


def _network(model: nn.Module, name: str, size: int, source: str, classes: int) -> Network:
    if size < 1:
        raise ConfigError(f"--image-size={size} must be >= 1.")
    conv = getattr(model, "polyscale_conv", "standard")
    # Dynamic PSConv ships frozen: TwoRateConv2d is exact in eval mode with nn.Conv2d's multiply-adds,
    # where the trainable layer runs two convs per kernel.
    return Network(convert_to_static(model.eval()), name, conv, size, source, int(classes))


def psconv_impls_used(model: nn.Module) -> dict[str, int]:
    """{impl: layers} of the PSConv layers as they run on the CPU (their impl, else the CPU default)."""
    used = Counter(
        m.impl or psconv_impls.default_impl(m, "cpu") for m in model.modules() if isinstance(m, PSConv2d)
    )
    return dict(sorted(used.items()))


# ---- export ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def module_tracker(model: nn.Module) -> Iterator[list[str]]:
    """The stack of `model`'s submodules whose forward is running, as "layer1.0.conv1 (PSConv2d)": where a
    tracer was when it raised (a module that raises never pops)."""
    names = {id(m): f"{n} ({type(m).__name__})" for n, m in model.named_modules() if n}
    stack: list[str] = []

    def enter(module: nn.Module, _args: Any) -> None:
        if id(module) in names:
            stack.append(names[id(module)])

    def leave(module: nn.Module, _args: Any, _out: Any) -> None:
        if id(module) in names and stack:
            stack.pop()

    hooks = [nn.modules.module.register_module_forward_pre_hook(enter)]
    hooks.append(nn.modules.module.register_module_forward_hook(leave))
    try:
        yield stack
    finally:
        for hook in hooks:
            hook.remove()


def _chain(err: BaseException) -> list[BaseException]:
    """err and the exceptions behind it (cause / context), outermost first."""
    seen: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


_OPERATOR = re.compile(r"(?:torch\.ops\.)?aten(?:\.|::)[A-Za-z_][\w.]*|op='aten\.\w+'")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def operator_of(err: BaseException) -> str | None:
    """The aten operator an exporter names in its error chain (innermost mention first): "aten.kthvalue"."""
    for exc in reversed(_chain(err)):
        found = _OPERATOR.findall(str(exc))
        if found:
            op = found[0].replace("op='", "").rstrip("'").replace("torch.ops.", "").replace("::", ".")
            return re.sub(r"\.default$", "", op)
    return None


def _where_in_graph(ep: Any, operator: str) -> str | None:
    """The module that calls `operator` in an ExportedProgram (the node's nn_module_stack)."""
    for node in ep.graph.nodes:
        if node.op == "call_function" and operator in str(node.target):
            stack = node.meta.get("nn_module_stack") or {}
            if stack:
                path, cls = list(stack.values())[-1]
                cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
                return f"{path} ({cls_name.rsplit('.', 1)[-1]})"
    return None


# what to try when a tool fails: the formats that do not go through it
_INSTEAD = {
    "torch.jit.trace": "--format exported-program or --format onnx (torch.export handles the Python "
    "autograd Functions and in-place ops that the JIT tracer refuses)",
    "torch.export": "--format torchscript (torch.jit.trace records the operators that run on an example "
    "batch, so data-dependent branches keep the example's way; the check on random batches tests that)",
    "torch.onnx.export": "--format exported-program (the same torch.export graph, run by PyTorch) or "
    "--format torchscript",
}


def _failure(net: Network, fmt: str, tool: str, err: BaseException, where: str | None) -> ExportError:
    """One paragraph: the network, the tool and layer that failed, the operator and the innermost error,
    what to try instead."""
    innermost = _chain(err)[-1]
    operator = operator_of(err)
    text = f"Cannot export {net.name} (conv {net.conv}) to {fmt}: {tool} failed"
    text += f" in {where}" if where else ""
    text += f" at operator {operator}" if operator else ""
    text += f": {type(innermost).__name__}: {_ANSI.sub('', one_line(innermost))}"
    text += "" if text.endswith(".") else "."
    return ExportError(f"{text} Try {_INSTEAD[tool]}; docs/export.md lists what exports per conv type.")


def _no_python_ops(net: Network, traced: torch.jit.ScriptModule) -> None:
    """ExportError for the first Python call (an autograd Function) in a trace: it runs in this process but
    torch.jit.save cannot store it, and no TorchScript runtime could run it."""
    for node in traced.inlined_graph.nodes():
        if node.kind() == "prim::PythonOp":
            path = node.scopeName().split("/")[-1].removeprefix("__module.")
            try:
                where = f"{path} ({type(net.model.get_submodule(path)).__name__})"
            except AttributeError:
                where = path or None
            message = f"the trace calls the Python autograd Function {node.pyname()}, which TorchScript "
            raise _failure(
                net, "torchscript", "torch.jit.trace", RuntimeError(message + "cannot store"), where
            )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' progress prints, partial-graph dumps, log records and deprecation / tracer
    warnings; their errors still raise, with everything they say."""
    names = ("onnxscript", "onnx_ir", "torch", "torch.fx.experimental.symbolic_shapes")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def onnx_modules() -> dict[str, Any]:
    """onnx, onnxscript and onnxruntime, or an ExportError naming the missing ones and the extra."""
    found, missing = {}, []
    for name in ONNX_MODULES:
        try:
            found[name] = importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(
            f"--format onnx needs {', '.join(ONNX_MODULES)}; missing: {', '.join(missing)}. {INSTALL_HINT} "
            "The torchscript and exported-program formats need PyTorch only."
        )
    return found


def export_model(net: Network, fmt: str, path: Path, opset: int | None = None) -> dict[str, Any]:
    """Write `net` as `fmt` to `path` (batch dynamic, H = W = its image size); ONNX returns {"opset": N}.

    Raises ExportError naming the layer and operator where the exporter stopped.
    """
    size, generator = net.image_size, torch.Generator().manual_seed(0)
    example = torch.randn(EXAMPLE_BATCH, 3, size, size, generator=generator)
    dynamic = ({0: torch.export.Dim("batch", min=1)},)
    modules = onnx_modules() if fmt == "onnx" else {}
    with torch.no_grad(), module_tracker(net.model) as stack, _quiet():
        if fmt == "torchscript":
            try:
                traced = torch.jit.trace(net.model, example, check_trace=False)
                _no_python_ops(net, traced)
                torch.jit.save(traced, str(path))
            except ExportError:
                raise
            except Exception as err:
                raise _failure(net, fmt, "torch.jit.trace", err, stack[-1] if stack else None) from err
            return {}
        try:
            ep = torch.export.export(net.model, (example,), dynamic_shapes=dynamic)
        except Exception as err:
            raise _failure(net, fmt, "torch.export", err, stack[-1] if stack else None) from err
        if fmt == "exported-program":
            torch.export.save(ep, str(path))
            return {}
        try:
            program = torch.onnx.export(
                ep,
                (example,),
                None,
                input_names=["images"],
                output_names=["logits"],
                opset_version=opset,
                dynamo=True,  # the torch.export-based exporter (the default since torch 2.9)
            )
            # one file; PSConv's per-term weight gathers stay in the graph over the dense weights and
            # runtimes fold them when loading (folded into the file, they would triple its size)
            program.save(str(path), external_data=False)
        except Exception as err:
            operator = operator_of(err)
            where = _where_in_graph(ep, operator) if operator else None
            raise _failure(net, fmt, "torch.onnx.export", err, where) from err
    imports = modules["onnx"].load(str(path), load_external_data=False).opset_import
    written = next(o.version for o in imports if o.domain in ("", "ai.onnx"))
    if opset is not None and written != opset:
        newest = modules["onnx"].defs.onnx_opset_version()
        why = (
            "it translates to opset 18 or newer and converts older requests with onnx's version converter, "
            f"which failed for {net.name} (conv {net.conv})"
            if opset < written
            else f"onnx {modules['onnx'].__version__} knows opsets up to {newest}"
        )
        raise ExportError(
            f"Asked for --opset {opset}, but torch.onnx.export wrote opset {written}: {why}. Use an opset "
            f"from 18 to {newest}; the file was not written."
        )
    return {"opset": written}


# ---- check ----------------------------------------------------------------------------------------------


def _runner(fmt: str, path: Path) -> tuple[Callable[[Tensor], Tensor], str]:
    """The written file, loaded by its own runtime: (images -> logits, what runs it)."""
    if fmt == "torchscript":
        with _quiet():
            module = torch.jit.load(str(path), map_location="cpu").eval()
        return module, f"torch.jit.load (torch {torch.__version__})"
    if fmt == "exported-program":
        return torch.export.load(str(path)).module(), f"torch.export.load (torch {torch.__version__})"
    ort = onnx_modules()["onnxruntime"]
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own types (Fail, InvalidGraph, NotImplemented)
        raise ExportError(
            f"onnxruntime {ort.__version__} cannot load the exported model ({type(err).__name__}: "
            f"{one_line(err)}). An opset newer than this onnxruntime supports? Try a lower --opset, or "
            "upgrade onnxruntime. The file was not written."
        ) from err
    batch_dim = session.get_inputs()[0].shape[0]
    if not isinstance(batch_dim, str):
        raise ExportError(f"The ONNX model's input has a fixed batch size ({batch_dim}), not a dynamic one.")

    def run(x: Tensor) -> Tensor:
        return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])

    return run, f"onnxruntime {ort.__version__} (CPUExecutionProvider)"


def check_export(net: Network, fmt: str, path: Path, tolerance: float, seed: int = 0) -> dict[str, Any]:
    """Run the written file on random batches of CHECK_BATCHES sizes against the eager model:
    {"runtime", "batches": [{"batch", "max_abs_diff", "bound"}]}; ExportError past a bound, on another
    output shape or where a batch size fails."""
    run, runtime = _runner(fmt, path)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for b in CHECK_BATCHES:
        x = torch.randn(b, 3, net.image_size, net.image_size, generator=generator)
        with torch.no_grad():
            expected = net.model(x)
            try:
                got = run(x)
            except Exception as err:
                raise ExportError(
                    f"The exported {fmt} model fails on a batch of {b} ({type(err).__name__}: "
                    f"{one_line(err)}): its batch size is not dynamic (exported from a batch of "
                    f"{EXAMPLE_BATCH}). The file was not written; please report this as a bug."
                ) from err
        if tuple(got.shape) != tuple(expected.shape):
            raise ExportError(
                f"The exported {fmt} model returns shape {tuple(got.shape)} for a batch of {b}; PyTorch "
                f"returns {tuple(expected.shape)}. The file was not written."
            )
        diff = float((got.float() - expected).abs().max())
        bound = tolerance * max(1.0, float(expected.abs().max()))
        rows.append({"batch": b, "max_abs_diff": diff, "bound": bound})
        if not diff <= bound:  # NaN fails too
            raise ExportError(
                f"The exported {fmt} model differs from PyTorch by up to {diff:.3g} on a batch of {b} "
                f"(allowed {bound:.3g} = --tolerance {tolerance:g} x max(1, max |logit|)), run by {runtime}. "
                "The file was not written. Raise --tolerance only if you accept the difference; otherwise "
                "try another --format."
            )
    return {"runtime": runtime, "batches": rows}


# ---- command --------------------------------------------------------------------------------------------


def _check_options(args: argparse.Namespace) -> None:
    """Option combinations that cannot work, before anything is loaded."""
    if args.opset is not None and args.format != "onnx":
        raise ConfigError(f"--opset applies to --format onnx only, not to {args.format}.")
    if args.format == "exported-program" and args.out.suffix != ".pt2":
        raise ConfigError(
            f"--out {args.out}: torch.export.save and load read .pt2 archives; name it {args.out.stem}.pt2."
        )
    if args.out.is_dir():
        raise ConfigError(f"--out {args.out} is a folder; name the file to write in it.")
    if not args.tolerance > 0:
        raise ConfigError(f"--tolerance={args.tolerance} must be > 0.")
    if args.format == "onnx":
        onnx_modules()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Export, check, then move the file into place (atomically: a failed check leaves no file at --out).
    Prints and returns the summary."""
    _check_options(args)
    net = load_network(args)
    params = sum(p.numel() for p in net.model.parameters())
    print(
        f"{net.name} (conv {net.conv}, {params / 1e6:.2f}M parameters, {net.num_classes} classes) from "
        f"{net.source}; input (N, 3, {net.image_size}, {net.image_size}), N dynamic"
    )
    impls = psconv_impls_used(net.model)
    if impls:
        print(
            "PSConv layers export the impl they run on the CPU: "
            + ", ".join(f"{k} x{n}" for k, n in impls.items())
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.stem}.{secrets.token_hex(4)}.tmp{args.out.suffix}")
    try:
        start = time.perf_counter()
        info = export_model(net, args.format, tmp, args.opset)
        seconds = time.perf_counter() - start
        check = check_export(net, args.format, tmp, args.tolerance, args.seed)
        os.replace(tmp, args.out)
    finally:
        tmp.unlink(missing_ok=True)
    size = args.out.stat().st_size
    opset = f" (opset {info['opset']})" if "opset" in info else ""
    print(f"exported {args.format}{opset} in {seconds:.1f} s -> {args.out} ({size / 1e6:.1f} MB)")
    diffs = ", ".join(f"batch {r['batch']}: {r['max_abs_diff']:.2e}" for r in check["batches"])
    bound = min(r["bound"] for r in check["batches"])
    print(f"max abs diff vs PyTorch, run by {check['runtime']}: {diffs} (allowed {bound:.1e})")
    summary = {
        "model": net.name,
        "conv": net.conv,
        "source": net.source,
        "format": args.format,
        "out": str(args.out),
        "bytes": size,
        "image_size": net.image_size,
        "num_classes": net.num_classes,
        "psconv_impls": impls,
        "export_s": seconds,
        **info,
        **check,
        "max_abs_diff": max(r["max_abs_diff"] for r in check["batches"]),
        "torch": torch.__version__,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The command: user errors print one paragraph and exit with code 2 (polyscale.cli's convention)."""
    args = parse_args(argv)
    with report_user_errors():
        summary = run(args)
    return summary


if __name__ == "__main__":
    main()
