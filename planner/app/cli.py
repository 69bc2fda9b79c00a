"""`bitplan`: profile a model, plan bits per module for a memory budget, apply the plan, evaluate it.

Every command stores what it makes in the SQLite database (`--db`, `BITPLAN_DB`, or the user data
directory) and, with `--json`, prints that object as one JSON document instead of a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from bitplan.db.formats import EXPORT_FORMATS, GGUF_OPTIONS
from bitplan.db.types import (DEFAULT_GPTQ_INPUTS, DEFAULT_OPTIONS, GPTQ_INPUTS, BitplanError, Evaluation,
                              InvalidInput, Plan, Profile)
from bitplan.planner.budgets import DEMO_BUDGETS

log = logging.getLogger("bitplan")

EPILOG = """examples:
  bitplan demo                                   # the whole job on the embedded SmolLM2-135M
  bitplan profile smollm2-135m --tokens 4096     # -> prof-...
  bitplan plan prof-... --budget 3.5bpw --allocator ilp --output plan.json
  bitplan plan --profile-file profile.json --budget 900MiB
  bitplan plan prof-... --budget 3bpw --granularity layer   # one option per decoder layer
  bitplan compare prof-... --allocators ilp,closed_form,greedy,uniform --budgets 2.5:4.5:0.25
  bitplan apply plan-... --out ./smollm2-3.5bpw
  bitplan eval ./smollm2-3.5bpw
  bitplan ls ; bitplan show plan-...
  bitplan serve --port 8000                      # HTTP API, docs at /docs
"""


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # migrations are routine, not news
    if args.quiet:
        # progress bars go to stderr too; --quiet silences ours and transformers' (read when it is imported)
        import os
        os.environ["TQDM_DISABLE"] = "1"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    from pydantic import ValidationError

    from bitplan.executor.llamacpp import LlamaCppFailed

    try:
        return args.func(args) or 0
    except BitplanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except LlamaCppFailed as e:  # not the input's fault: the tool's own last lines say what went wrong
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `bitplan ls | head` closed the pipe: the reader has what it wanted
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit must not fail
        return 0
    except ValidationError as e:  # a setting of the wrong type or range, caught by the request's schema
        err = e.errors()[0]
        where = "--" + "-".join(str(x) for x in err["loc"]).replace("_", "-")
        print(f"error: {where}: {err['msg']}", file=sys.stderr)
        return 2


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (0 tokens or a window of 0 is never what was meant)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:20]!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive: give 1 or more")
    return value


SERVER_COMMANDS = ("profile", "plan", "compare", "apply", "eval")  # the kinds of job the service runs


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bitplan", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", help="SQLAlchemy URL or SQLite file (default: $BITPLAN_DB or the user data dir)")
    common.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log lines")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name, func, arguments, help in COMMANDS:
        c = sub.add_parser(name, parents=[common], help=help, description=help)
        c.set_defaults(func=func)
        arguments(c)
        if name in SERVER_COMMANDS:
            c.add_argument("--server", metavar="URL", default=os.environ.get("BITPLAN_SERVER"),
                           help="run as a job of the `bitplan serve` at URL (default $BITPLAN_SERVER), following "
                                "its progress; paths are the server's, inside its allowed roots; the token is "
                                "$BITPLAN_TOKEN")
    return p


def _profile_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("model", nargs="?", default="smollm2-135m",
                   help="Hugging Face checkpoint directory, .gguf file, or 'smollm2-135m' (default)")
    c.add_argument("--calib", help="calibration text: a file, a glob, or shakespeare:calib (default)")
    c.add_argument("--tokens", type=positive_int, help="calibration tokens (default 4096)")
    c.add_argument("--seq-len", type=positive_int, help="tokens per calibration sequence (default 512)")
    c.add_argument("--engine", choices=["bitplan", "llamacpp"],
                   help="llamacpp: the options are GGUF types (Q2_K..Q8_0, and the 32-block types rows not a "
                        "multiple of 256 fall back to), each module's error measured with llama.cpp's own "
                        "quantization and sizes its blocks' (needs `make llamacpp`; docs/llamacpp.md)")
    c.add_argument("--options", help=f"bit widths to consider (default {DEFAULT_OPTIONS}); with --engine "
                                     f"llamacpp GGUF types (default {','.join(GGUF_OPTIONS)})")
    c.add_argument("--group-sizes", metavar="G,G,...",
                   help="quantization group sizes: every --options width is profiled at each (default 64; e.g. "
                        "32,64,128,ch, ch = per-channel); sizes count each group's scale and zero exactly")
    estimator_args(c)
    embeddings_arg(c)
    c.add_argument("--validate", action="store_true",
                   help="instead of storing a profile: rank-correlate --validate-estimators against measured KL "
                        "(single-module KL on --validate-layers) and print the table")
    c.add_argument("--validate-estimators", default="hessian,fisher", metavar="E,E,...",
                   help="estimators --validate compares (default hessian,fisher; also hutchinson, imatrix with "
                        "--imatrix, calibrated)")
    c.add_argument("--validate-layers", default="0,8,16,24", metavar="L,L,...",
                   help="decoder layers whose modules get measured KL for --validate (default 0,8,16,24)")
    c.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    c.add_argument("--stream-weights", choices=["auto", "on", "off"],
                   help="read the weights from the checkpoint's safetensors shards one decoder block at a time, "
                        "so a model larger than host memory profiles: host memory ~ one block + activations + "
                        "statistics (docs/profiling.md). auto (default): when the weights, in float32, would take "
                        "over 60%% of the available memory; logged. Streams --estimator hessian only; the profile "
                        "is the one an in-memory load gives")
    c.add_argument("--kl-experts", type=int, metavar="K",
                   help="an MoE model with --estimator calibrated: measure KL on K routed experts per layer and role "
                        "(evenly spaced by routed tokens, the busiest first); the others take their median scale. "
                        "Bounds the KL passes per layer whatever the number of experts (default: every expert)")
    ray_arg(c)
    c.add_argument("--force", action="store_true", help="recompute even if the same profile is stored")
    c.add_argument("--resume", action="store_true",
                   help="continue an interrupted profile of the same model and settings where it stopped: "
                        "hessian and GPTQ statistics from the block after the last finished one, fisher from "
                        "its last saved accumulators (saved every 5 min); kl and calibrated's KL points restart")
    c.add_argument("--output", help="also write the profile as bitplan.profile/2 JSON to this file")
    c.add_argument("--latency", metavar="SOURCE",
                   help="also fill the latency table (seconds per module, option and batch), which "
                        "`plan --latency-budget` needs: roofline:GPU for GPU in H100, H200, A100, L40S, RTX4090 "
                        "(datasheet bandwidth and bf16 FLOP/s, no GPU needed), or measured (this machine's GPU, the "
                        "project's kernels timed cold in L2; cached per GPU)")
    c.add_argument("--latency-batches", default="1,16,256", metavar="B,B,...",
                   help="batch sizes of the latency table (default 1,16,256)")


def _plan_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("profile", nargs="?", help="stored profile id (or unique prefix)")
    c.add_argument("--profile-file", help="plan from a bitplan.profile/2 JSON file instead (no model needed)")
    c.add_argument("--budget", default="3.5bpw", help="3.5bpw (overheads included), 900MiB, 0.9GiB, ...")
    c.add_argument("--allocator", default="ilp",
                   help="ilp (default), closed_form, greedy, dp, uniform, or evolutionary (loads the profile's "
                        "model and searches on measured KL, starting from ilp's plan)")
    c.add_argument("--search-state", metavar="PATH",
                   help="evolutionary: keep the search state in this JSON file and resume from it if it exists")
    c.add_argument("--latency-budget", metavar="TIME@batchB",
                   help="also at most this latency per forward pass at batch B, e.g. 8ms@batch1 or 250us@batch16 "
                        "(units s, ms, us; B one of the profile's latency batches; ilp only)")
    c.add_argument("--objective", default="error", metavar="error|latency|error+λ*latency",
                   help="what ilp minimises: predicted error (default), latency, or error+λ*latency with λ in "
                        "nats per millisecond (λ nats of predicted loss increase per token weigh as much as "
                        "1 ms at the --latency-budget's batch, else the profile's smallest), "
                        "e.g. error+0.5*latency")
    plan_options(c)
    c.add_argument("--budget-split", default="model", choices=["model", "block"],
                   help="model (default): one budget for the whole model; block: every decoder block gets the "
                        "same bits per weight, solved block by block (MC-MoE's allocation, a baseline)")
    ray_arg(c)  # the evolutionary search's offspring
    c.add_argument("--output", help="also write the plan as JSON to this file")


def _compare_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("profile", nargs="?", help="stored profile id (or unique prefix)")
    c.add_argument("--profile-file", help="a bitplan.profile/2 JSON file instead")
    c.add_argument("--allocators", default="ilp,closed_form,greedy,uniform",
                   help="comma-separated allocators (default ilp,closed_form,greedy,uniform; evolutionary too, "
                        "which loads the profile's model once for all budgets)")
    c.add_argument("--budgets", default="2.5:4.5:0.25",
                   help="START:STOP:STEP in bits per weight (both ends included), or a list like "
                        "3bpw,3.5bpw,900MiB (default 2.5:4.5:0.25)")
    plan_options(c)
    c.add_argument("--evaluate", action="store_true",
                   help="also measure each plan on the profile's model, in memory: held-out perplexity and KL "
                        "to the unquantized model")
    c.add_argument("--eval-tokens", type=positive_int, default=2048, help="evaluation tokens for --evaluate (default 2048)")
    c.add_argument("--against", metavar="MIX,MIX,...",
                   help="with a profile of GGUF types (profile --engine llamacpp): llama.cpp's stock mixes, e.g. "
                        "Q2_K,Q3_K_S,Q3_K_M,Q3_K_L,Q4_K_S,Q4_K_M,Q5_K_M; each is made by llama-quantize, and "
                        "--allocators plan at its exact tensor bytes; all measured by llama-perplexity (perplexity, "
                        "KL divergence to the F16 base) on the held-out text (needs --evaluate; --budgets unused)")
    ray_arg(c)
    c.add_argument("--output", help="also write the table as JSON to this file")


def _apply_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("plan", help="stored plan id (or unique prefix), or a plan JSON file")
    c.add_argument("--out", required=True, help="output directory (written atomically)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    c.add_argument("--format", default="bitplan",
                   choices=EXPORT_FORMATS,
                   help="bitplan (default, our kernels), gptqmodel (GPTQ with per-module dynamic rules: GPTQModel, "
                        "vLLM), compressed-tensors (pack-quantized: vLLM), llamacpp (a --tensor-type-file and the "
                        "llama-quantize command line), gguf (--out FILE.gguf, written by the built llama-quantize "
                        "from the model's F16 GGUF, its tensor types checked against the plan; `make llamacpp`)")
    c.add_argument("--gptq-inputs", choices=GPTQ_INPUTS, default=DEFAULT_GPTQ_INPUTS,
                   help="a GPTQ profile's plans: each block's input statistics from the plan's model quantized up "
                        "to that block (quantized, default: GPTQ for the inputs the deployed model feeds it; one "
                        "more pass per plan) or from the unquantized model (original: shared by every plan)")
    c.add_argument("--stream-weights", choices=["auto", "on", "off"], default="auto",
                   help="read the weights from the checkpoint's safetensors shards one decoder block at a time and "
                        "write the output from parts, so a model larger than host memory applies (--format bitplan, "
                        "--gptq-inputs original); the files are the same as with the model loaded whole. auto "
                        "(default): when the weights, in float32, would take over 60%% of the available memory")


def _eval_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("checkpoint", help="checkpoint written by apply, any HF directory, .gguf, or smollm2-135m")
    c.add_argument("--text", help="evaluation text: a file, a glob, or shakespeare:eval (default)")
    c.add_argument("--tokens", type=positive_int, default=8192, help="evaluation tokens (default 8192)")
    c.add_argument("--window", type=positive_int, default=512, help="tokens per scored window (default 512)")
    c.add_argument("--device", default="cpu",
                   help="cpu, or cuda: the fused kernels, plus decode tokens/s and peak memory beside bf16")
    c.add_argument("--speed-batches", default="1,16", metavar="B,B,...",
                   help="on cuda: batch sizes of the decode-speed test (128 new tokens after 512); '' for none")
    c.add_argument("--compile", action="store_true",
                   help="on cuda: torch.compile the decode step of both models before it is timed (Inductor fuses "
                        "the norms, rotary embedding and adds; about a minute per model)")
    c.add_argument("--engine", choices=["bitplan", "llamacpp"],
                   help="who measures: bitplan (default, except for a .gguf path), or llamacpp: llama-perplexity "
                        "on a .gguf (each window of --window tokens scores its second half; `make llamacpp`)")
    c.add_argument("--base", metavar="MODEL",
                   help="with llamacpp: the model the .gguf was quantized from (a .gguf, a HF directory or "
                        "smollm2-135m); also measure the KL divergence to its F16 GGUF")


def _ls_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("kind", nargs="?", choices=["profiles", "plans", "evaluations"], help="only this kind")


def _show_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("id", help="id or unique prefix")


def _serve_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("--host", default="127.0.0.1")
    c.add_argument("--port", type=int, default=8000)
    c.add_argument("--workers", type=non_negative_int, default=1,
                   help="worker processes that run jobs (default 1; 0: jobs wait for a `bitplan worker`)")
    c.add_argument("--solve-in", choices=["processes", "threads"],
                   help="where quick plans are solved: 2 processes (default; $BITPLAN_SOLVE_IN) or 2 threads")
    ray_arg(c)  # the workers' profile jobs


def _worker_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("--once", action="store_true", help="stop when no job is queued instead of waiting for more")
    c.add_argument("--lease", type=positive_int, default=30,
                   help="seconds without a heartbeat after which another worker's job is taken for dead "
                        "and resumed (default 30)")
    c.add_argument("--parent", type=int, help=argparse.SUPPRESS)  # the `serve` whose death ends this worker
    ray_arg(c)


def non_negative_int(text: str) -> int:
    """An argparse type: a whole number >= 0."""
    value = positive_int(text) if text.strip() != "0" else 0
    return value


def _demo_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("--model", default="smollm2-135m", help="model to run on (default: the embedded SmolLM2)")
    c.add_argument("--budgets", default=",".join(DEMO_BUDGETS),
                   help=f"comma-separated budgets (default {','.join(DEMO_BUDGETS)})")
    c.add_argument("--allocators", default="ilp,uniform", help="comma-separated allocators")
    estimator_args(c)
    embeddings_arg(c)
    c.add_argument("--tokens", type=positive_int, help="calibration tokens (default 4096)")
    c.add_argument("--eval-tokens", type=positive_int, default=8192, help="evaluation tokens (default 8192)")
    c.add_argument("--out", default="runs", help="where the quantized checkpoints go (default ./runs)")
    ray_arg(c)


def estimator_args(c: argparse.ArgumentParser) -> None:
    c.add_argument("--estimator", choices=["fisher", "hessian", "kl", "calibrated", "hutchinson", "imatrix"],
                   help="error estimator (default calibrated): fisher (Fisher-weighted ΔW², one backward pass), "
                        "hessian (layer-output error, forward only), kl (measured: quantize one module at a "
                        "time and measure KL to the base model; modules x options forward passes, 512 tokens), "
                        "calibrated (fisher, each module's row rescaled to KL measured at its two lowest "
                        "bit widths: 2 forward passes per module), hutchinson (HAWQ-V2: ½·mean Hessian diagonal·"
                        "||ΔW||², the Hessian trace from Rademacher probes through double backward; 4 probes per "
                        "sequence, about 3 backward passes each), imatrix (hessian with diagonal H read from "
                        "a llama.cpp importance matrix: --imatrix)")
    c.add_argument("--imatrix", metavar="PATH",
                   help="a llama.cpp imatrix.gguf (or legacy .dat) of this model, for --estimator imatrix (implied): "
                        "each module's H diagonal is its in_sum2/counts; the file's hash goes into the profile id. "
                        "With --engine llamacpp it is the quantizer's importance matrix instead: llama.cpp's rounding "
                        "of every GGUF type is weighted by it, in the profile as in llama-quantize --imatrix when "
                        "its plans are applied ('calibration': llama-imatrix makes one from the calibration text)")
    c.add_argument("--quantizer", metavar="rtn|gptq[:KEY=VALUE,...]",
                   help="where each option's ΔW comes from; apply uses the same one (default gptq:clip=true: GPTQ "
                        "with the profile's H, damp=0.1, block_size=128, act_order=true, each group's range searched "
                        "for the least rounding error; e.g. gptq:damp=0.05 changes one, gptq alone keeps min-max "
                        "ranges; rtn: round to nearest, needs no H; rtn:clip=true searches the ranges too)")


def embeddings_arg(c: argparse.ArgumentParser) -> None:
    c.add_argument("--embeddings", choices=["plan", "keep"],
                   help="plan (default; keep with --imatrix): the input embedding (with a tied head, the pair: one "
                        "tensor) is a module the plan gives 4 bits or more (RTN, groups inside each row), counted in "
                        "bits/weight; keep: it stays 16-bit, outside the plan, counted only by size budgets "
                        "(docs/embeddings.md)")


def plan_options(c: argparse.ArgumentParser) -> None:
    """The options `plan` and `compare` share."""
    c.add_argument("--granularity", default="module",
                   help="units that share one option: module (default), expert (all matrices of one MoE "
                        "expert), layer (all modules of one decoder layer), layer_experts (all routed experts "
                        "of a layer, as vLLM and llama.cpp run them; attention free)")
    c.add_argument("--engine", choices=["bitplan", "vllm", "llamacpp"],
                   help="what will run the plan (default: llamacpp for a profile of GGUF types, else bitplan): "
                        "bitplan (any option per module), vllm (q/k/v and "
                        "gate/up tied, all experts of a layer tied, GPTQ widths), llamacpp (experts tied per "
                        "matrix kind, GGUF types and their exact sizes)")
    c.add_argument("--pin", action="append", default=[], metavar="PATTERN(=|>=|<=)BITS",
                   help="constrain modules matching a glob, e.g. 'model.layers.0.*>=4' (repeatable)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--time-limit", type=float, help="solver time limit, seconds")
    c.add_argument("--generations", type=positive_int, help="evolutionary: generations (default 20)")
    c.add_argument("--offspring", type=positive_int, help="evolutionary: offspring per generation (default 16)")
    c.add_argument("--fitness-tokens", type=positive_int,
                   help="evolutionary: tokens of calibration text it selects on (default 1024)")
    c.add_argument("--heldout-tokens", type=positive_int,
                   help="evolutionary: tokens of calibration text it picks its result on, never selected on "
                        "(default 512)")


def _store(args):
    from bitplan.db.store import Store
    return Store(args.db)


def _workspace(args, **kw):
    from bitplan.planner.app.workspace import Workspace
    return Workspace(_store(args), progress=not args.quiet, cluster=_cluster(args), **kw)


def _cluster(args):
    from bitplan.profiler.cluster import Cluster
    return Cluster.parse(getattr(args, "ray", None))


def ray_arg(c: argparse.ArgumentParser) -> None:
    c.add_argument("--ray", metavar="local|auto|ADDRESS",
                   help="spread independent work over a Ray cluster: a profile's modules (GPTQ, error rows) and KL "
                        "points, the evolutionary search's offspring. local starts one on this machine, auto joins "
                        "the one this machine is a node of, or a head's host:port; off for none (default "
                        "$BITPLAN_RAY_ADDRESS). Results are the same as without; needs pip install 'bitplan[ray]' "
                        "(docs/scale.md)")


def _profile_request(args):
    """The profile settings `profile` and `demo` share (`demo` has no calibration or option flags)."""
    from bitplan.planner.app.usecases import ProfileRequest
    names = ("engine", "options", "group_sizes", "estimator", "quantizer", "calib", "tokens", "seq_len", "device",
             "imatrix", "embeddings", "latency", "latency_batches", "stream_weights", "kl_experts")
    return ProfileRequest(**{n: getattr(args, n) for n in names if hasattr(args, n)})


def _plan_request(args, **given):
    """The plan settings `plan` and `compare` share, plus the command's own (`given`)."""
    from bitplan.planner.request import PlanRequest
    return PlanRequest(pins=args.pin, seed=args.seed, time_limit=args.time_limit, granularity=args.granularity,
                       engine=args.engine, params=_search_params(args), **given)


def _emit(args, obj: dict, human: str) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str) if args.json else human)


# ------------------------------------------------------------------------------------- commands


def _on_server(args, kind: str, params: dict, local: dict[str, bool]) -> None:
    """Run the command as a job of the server at --server: `params` as the job API takes them (local paths
    made absolute), `local` the flags only a local run has (refused when given)."""
    from bitplan.planner.app.client import Client
    given = [flag for flag, on in local.items() if on]
    if given:
        raise_input(f"{given[0]} runs locally only: drop it or --server")
    for key in ("model", "calib", "text", "imatrix", "out", "checkpoint", "base", "profile_file"):
        if isinstance(params.get(key), str) and Path(params[key]).expanduser().exists():
            params[key] = str(Path(params[key]).expanduser().resolve())  # the same file, wherever the server runs
    job = Client(args.server).run(kind, params, progress=not args.quiet)
    made = job.get("result_id") or (job.get("result") or {}).get("checkpoint", "")
    _emit(args, job, f"job {job['id']} succeeded on {args.server}" + (f": {made}" if made else ""))


def cmd_profile(args):
    from bitplan.db.files import write_json
    from bitplan.planner.app.usecases import profile_options, run_profile
    if args.server:
        return _on_server(args, "profile", {"model": args.model, "force": args.force,
                                            **_profile_request(args).model_dump(exclude_defaults=True)},
                          {"--validate": args.validate, "--output": bool(args.output), "--resume": args.resume,
                           "--ray": args.ray is not None})
    if args.validate:
        return cmd_validate(args)
    request = _profile_request(args)
    profile_options(request)  # bad options or quantizer are refused before the store is opened (or made)
    profile = run_profile(_workspace(args), args.model, request, force=args.force, resume=args.resume)
    if args.output:
        write_json(args.output, profile.to_dict())
    _emit(args, profile.to_dict(), format_profile(profile))


def cmd_validate(args):
    from bitplan.planner.app.usecases import run_validate
    try:
        layers = [int(x) for x in args.validate_layers.split(",") if x.strip()]
    except ValueError:
        raise InvalidInput(f"--validate-layers {args.validate_layers!r}: give layer numbers separated by commas, "
                           f"e.g. 0,8,16") from None
    request = _profile_request(args).model_copy(update={"latency": None})
    result = run_validate(_workspace(args), args.model, request, layers=layers,
                          estimators=_csv(args.validate_estimators))
    _emit(args, result, format_validation(result))


def format_validation(r: dict) -> str:
    lines = [f"Spearman ρ against measured KL ({r['quantizer']}; {r['n_modules']} modules x "
             f"{len(r['options'])} options, KL on {r['tokens']['kl']} tokens, estimators on "
             f"{r['tokens']['estimators']}):",
             f"  {'estimator':<10} {'pooled':>7}  " + "  ".join(f"{o:>8}" for o in r["options"]) + "  seconds"]
    for e, rho in r["spearman"].items():
        per = "  ".join(f"{x:>8.3f}" for x in r["per_option"][e])
        lines.append(f"  {e:<10} {rho:>7.3f}  {per}  {r['seconds'][e]:7.0f}")
    lines.append(f"  (kl itself: {r['seconds']['kl']:.0f} s)")
    return "\n".join(lines)


def cmd_plan(args):
    from bitplan.db.files import write_json
    from bitplan.planner.app.usecases import run_plan
    request = _plan_request(args, budget=args.budget, allocator=args.allocator, latency_budget=args.latency_budget,
                            objective=args.objective, budget_split=args.budget_split).checked()
    if args.server:
        return _on_server(args, "plan", {"profile": args.profile, "profile_file": args.profile_file,
                                         **request.model_dump(exclude_defaults=True)},
                          {"--search-state": bool(args.search_state), "--output": bool(args.output),
                           "--ray": args.ray is not None})
    ws = _workspace(args)
    profile = _profile_arg(ws.store, args)
    plan = run_plan(ws, profile, request, search_state=args.search_state)
    if args.output:
        write_json(args.output, plan.to_dict())
    _emit(args, plan.to_dict(), format_plan(plan, profile))


def _search_params(args) -> dict:
    """The evolutionary allocator's parameters given as options (any other allocator refuses them)."""
    return {k: v for k in ("generations", "offspring", "fitness_tokens", "heldout_tokens")
            if (v := getattr(args, k)) is not None}


def cmd_compare(args):
    from bitplan.db.files import write_json
    from bitplan.planner.app.usecases import run_compare
    from bitplan.planner.budgets import parse_budgets
    if args.against:
        return _compare_against(args)
    budgets = parse_budgets(args.budgets)  # a bad budget fails before the profile is read
    request = _plan_request(args)
    if args.server:
        return _on_server(args, "compare", {"profile": args.profile, "profile_file": args.profile_file,
                                            "budgets": args.budgets, "evaluate": args.evaluate,
                                            "eval_tokens": args.eval_tokens, **({"allocators": args.allocators}
                                                                                if args.allocators else {}),
                                            **request.model_dump(exclude_defaults=True)},
                          {"--output": bool(args.output), "--ray": args.ray is not None})
    ws = _workspace(args)
    rows = [r.model_dump() for r in run_compare(ws, _profile_arg(ws.store, args), budgets, _csv(args.allocators),
                                                request, evaluate=args.evaluate, eval_tokens=args.eval_tokens)]
    if args.output:
        write_json(args.output, {"rows": rows})
    _emit(args, {"rows": rows}, format_compare(rows))


def _compare_against(args):
    from bitplan.db.files import write_json
    from bitplan.planner.app.stockmix import parse_mixes, run_stock_compare, spearman
    if not args.evaluate:
        raise_input("--against measures every file with llama-perplexity: add --evaluate")
    mixes = parse_mixes(args.against)
    allocators = [a for a in _csv(args.allocators) if a != "uniform"] if args.allocators else ["ilp"]
    ws = _workspace(args)
    rows = run_stock_compare(ws, _profile_arg(ws.store, args), mixes, allocators=allocators,
                             eval_tokens=args.eval_tokens)
    doc = {"rows": [r.model_dump() for r in rows], "spearman_predicted_error_kl": spearman(rows)}
    if args.output:
        write_json(args.output, doc)
    _emit(args, doc, format_stock_compare(doc))


def format_stock_compare(doc: dict) -> str:
    head = f"{'name':>14} {'matched to':>10} {'size B':>11} {'pred. B':>11} {'ppl':>9} {'KLD':>8} {'pred.err':>9}  plan"
    lines = [head, "-" * len(head)]

    def num(v, f):
        return format(v, f) if v is not None else "-"
    for r in doc["rows"]:
        lines.append(f"{r['name']:>14} {r['at']:>10} {r['size_bytes']:>11} {num(r['predicted_size_bytes'], '>11')} "
                     f"{r['perplexity']:>9.3f} {num(r['kl_divergence'], '>8.5f')} {num(r['predicted_error'], '>9.4f')}  "
                     f"{r['plan_id'] or ''}")
    rho = doc["spearman_predicted_error_kl"]
    lines.append(f"Spearman ρ (predicted error, llama.cpp's KL divergence): {num(rho, '.3f')}")
    return "\n".join(lines)


def _profile_arg(store, args) -> Profile:
    """The profile named by a stored id or by --profile-file (exactly one of them)."""
    from bitplan.db.files import read_profile_file
    if bool(args.profile) == bool(args.profile_file):
        raise_input("give a stored profile id or --profile-file FILE (one of them)")
    return read_profile_file(args.profile_file) if args.profile_file else _find(store, args.profile, "profile")


def cmd_apply(args):
    from bitplan.planner.app.usecases import run_apply
    if args.server:
        return _on_server(args, "apply", {"plan": args.plan, "out": args.out, "overwrite": args.overwrite,
                                          "format": args.format, "gptq_inputs": args.gptq_inputs},
                          {"a plan file": Path(args.plan).is_file(), "--stream-weights": args.stream_weights != "auto"})
    ws = _workspace(args)
    if Path(args.plan).is_file():
        plan = Plan.from_dict(_read_json(args.plan))
    else:
        plan = _find(ws.store, args.plan, "plan")
    out = run_apply(ws, plan, args.out, overwrite=args.overwrite, fmt=args.format, gptq_inputs=args.gptq_inputs,
                    stream_weights=args.stream_weights)
    _emit(args, {"id": plan.id, "checkpoint": str(out)}, f"wrote {out} (plan {plan.id}, "
          f"{plan.bits_per_weight:.3f} bpw, {plan.size_mib:.1f} MiB)")


def cmd_eval(args):
    from bitplan.planner.app.usecases import run_eval
    batches = [int(b) for b in args.speed_batches.split(",") if b.strip()]
    if args.server:
        return _on_server(args, "eval", {k: getattr(args, k) for k in ("checkpoint", "text", "tokens", "window",
                                                                          "device", "engine", "base")},
                          {"--speed-batches": args.device == "cuda" and bool(batches), "--compile": args.compile})
    if args.compile and not (args.device.startswith("cuda") and batches):
        raise_input("--compile is for the decode-speed test: add --device cuda (and keep --speed-batches)")
    ev = run_eval(_workspace(args), args.checkpoint, text=args.text, tokens=args.tokens, window=args.window,
                  device=args.device, speed_batches=batches, engine=args.engine, base=args.base,
                  speed_compile=args.compile)
    _emit(args, ev.model_dump(mode="json"), format_evaluation(ev))


def cmd_ls(args):
    store = _store(args)
    kinds = [args.kind] if args.kind else ["profiles", "plans", "evaluations"]
    listing = {k: getattr(store, f"list_{k}")() for k in kinds}
    if args.json:
        print(json.dumps({k: [_summary(o) for o in v] for k, v in listing.items()}, indent=2, default=str))
        return
    for k, objs in listing.items():
        print(f"{k} ({len(objs)})")
        for o in objs:
            print("  " + "  ".join(f"{v}" for v in _summary(o).values()))


def cmd_show(args):
    store = _store(args)
    kind, obj = store.find(args.id)
    if kind == "profile":
        _emit(args, obj.to_dict(), format_profile(obj))
    elif kind == "plan":
        from bitplan.planner.app.heatmap import expert_heatmap
        profile = _maybe_profile(store, obj.profile_id)
        _emit(args, obj.to_dict(), "\n".join(filter(None, [format_plan(obj, profile), expert_heatmap(obj, profile)])))
    else:
        _emit(args, obj.model_dump(mode="json"), format_evaluation(obj))


def cmd_serve(args):
    import os
    import subprocess
    import threading

    import uvicorn

    from bitplan.planner.app.service import create_app
    # quick plans are solved in processes of their own: a burst of them never holds up a read (docs/service.md)
    solve_in = args.solve_in or os.environ.get("BITPLAN_SOLVE_IN") or "processes"
    app = create_app(args.db, solve_in=solve_in)  # migrates the database before the workers open it
    # workers are processes of their own: a job's model and its CPU never sit in the server
    argv = [sys.executable, "-m", "bitplan.planner.app.cli", "worker", "--parent", str(os.getpid())]
    argv += ["--db", args.db] if args.db else []
    argv += ["--quiet"] if args.quiet else []
    argv += ["--ray", args.ray] if args.ray else []
    workers = [subprocess.Popen(argv) for _ in range(args.workers)]
    stop = threading.Event()

    def supervise():  # a worker that died (killed, out of memory) is replaced; its job is recovered
        while not stop.wait(1.0):
            for i, w in enumerate(workers):
                if w.poll() is not None and not stop.is_set():
                    log.warning("worker pid %d ended (exit %s): starting another", w.pid, w.returncode)
                    workers[i] = subprocess.Popen(argv)

    threading.Thread(target=supervise, daemon=True, name="workers").start()
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info")
    finally:
        stop.set()
        for w in workers:
            w.terminate()
        for w in workers:
            try:
                w.wait(timeout=10)
            except subprocess.TimeoutExpired:
                w.kill()


def cmd_worker(args):
    from bitplan.planner.app.worker import run_worker
    ran = run_worker(args.db, parent=args.parent, once=args.once, lease=args.lease, cluster=_cluster(args))
    if args.once:
        _emit(args, {"jobs": ran}, f"ran {ran} job{'s' if ran != 1 else ''}")


def cmd_demo(args):
    from bitplan.planner.app.usecases import run_demo
    rows = run_demo(_workspace(args, keep_gptq=True), source=args.model, budgets=_csv(args.budgets),
                    allocators=_csv(args.allocators), profile_request=_profile_request(args),
                    eval_tokens=args.eval_tokens, out_dir=args.out)
    rows = [r.model_dump() for r in rows]
    _emit(args, {"rows": rows}, format_rows(rows))


# ----------------------------------------------------------------------------------- formatting


def format_profile(p: Profile) -> str:
    return (f"profile {p.id}: {p.model.name}, estimator {p.estimator} ({p.quantizer.label}), {len(p.modules)} modules x "
            f"{len(p.options)} options ({', '.join(o.label for o in p.options)}), "
            f"{p.calibration.n_tokens} tokens of {p.calibration.name or '?'}, {p.seconds:.0f} s"
            + (", embedding planned" if p.plan_embeddings else "")
            + (f", latency {p.latency_source} at batches {','.join(map(str, p.latency_batches))}"
               if p.latency is not None else "")
            + _format_estimated(p.estimated))


def _format_estimated(estimated: dict[str, str], shown: int = 10) -> str:
    if not estimated:
        return ""
    n = len(estimated)
    lines = [f"\n  {n} module{'s' if n > 1 else ''}' errors estimated where they were to be measured:"]
    lines += [f"    {name}: {why}" for name, why in list(estimated.items())[:shown]]
    if len(estimated) > shown:
        lines.append(f"    ... and {len(estimated) - shown} more (--json lists them all)")
    return "\n".join(lines)


def format_plan(plan: Plan, profile: Profile | None = None) -> str:
    from bitplan.planner.plan import summarize
    hist = summarize(plan, profile)
    widths = sorted({b for c in hist.values() for b in c})
    lines = [f"plan {plan.id}  ({plan.allocator}, budget {plan.budget}, profile {plan.profile_id})",
             f"  {'role':<12}" + "".join(f"{str(b) + 'b':>6}" for b in widths)]
    for role, c in hist.items():
        lines.append(f"  {role:<12}" + "".join(f"{c.get(b, 0):>6}" for b in widths))
    lines += [f"  bits/weight      {plan.bits_per_weight:.4f}",
              f"  size             {plan.size_mib:.2f} MiB (planned {plan.total_bits / 8 / 2**20:.2f} MiB "
              f"+ fixed {plan.fixed_bits / 8 / 2**20:.2f} MiB)",
              f"  predicted error  {plan.predicted_error:.6g}"]
    if plan.predicted_latency:
        from bitplan.planner.latency import format_seconds
        lines.append("  latency          " + ", ".join(f"{format_seconds(t)} at batch {b}"
                                                         for b, t in sorted(plan.predicted_latency.items()))
                     + f" ({plan.latency_source}" + (f", budget {plan.params['latency_budget']})"
                                                     if "latency_budget" in plan.params else ")"))
    lines.append(f"  solver           {plan.status}, {plan.solve_seconds:.3f} s")
    return "\n".join(lines)


def format_evaluation(ev: Evaluation) -> str:
    out = (f"evaluation {ev.id}: perplexity {ev.perplexity:.3f} on {ev.n_tokens} tokens of {ev.corpus} "
           f"(window {ev.window}), {ev.bytes_on_disk / 2**20:.1f} MiB on disk, {ev.seconds:.0f} s")
    if ev.engine == "llamacpp":
        out += " (llama-perplexity: each window scores its second half" + (
            f"; KL divergence to the base {ev.kl_divergence:.5f} nats/token)" if ev.kl_divergence is not None else ")")
    if ev.speed:
        s = ev.speed
        out += (f"\ndecode, {s['new_tokens']} new tokens after {s['prompt']} (weights {s['weights_gib']['model']:.2f} "
                f"GiB, bf16 {s['weights_gib']['bf16']:.2f} GiB):")
        for b, r in s["batches"].items():
            m, f = r["model"], r["bf16"]
            out += (f"\n  batch {b:>3}: {m['decode_tokens_per_s']:9.1f} tok/s, peak {m['peak_gib']:.2f} GiB  |  bf16 "
                    f"{f['decode_tokens_per_s']:9.1f} tok/s, peak {f['peak_gib']:.2f} GiB  |  x{r['speedup']:.2f}"
                    + ("" if m["cuda_graph"] else "  (eager: step not capturable)"))
    return out


def format_rows(rows: list[dict]) -> str:
    head = f"{'budget':>8} {'allocator':>12} {'bits/w':>7} {'MiB':>8} {'pred.err':>9} {'ppl':>9} {'time s':>7}  plan"
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(f"{r['budget']:>8} {r['allocator']:>12} {r['bits_per_weight']:>7.3f} {r['size_mib']:>8.2f} "
                   f"{r['predicted_error']:>9.4f} {r['perplexity']:>9.2f} {r['seconds']:>7.1f}  {r['plan_id'] or ''}")
    return "\n".join(out)


def format_compare(rows: list[dict]) -> str:
    """The sweep as a table, one row per (budget, allocator); an infeasible pair shows its message."""
    measured = any(r.get("perplexity") is not None for r in rows)
    head = (f"{'budget':>9} {'allocator':>12} {'pred.err':>10} {'bits/w':>7} {'MiB':>9} {'time s':>8}  "
            + (f"{'ppl':>9} {'KL':>8}  " if measured else "") + f"{'status':<28} plan")
    out = [head, "-" * len(head)]
    for r in rows:
        if r["error"]:
            out.append(f"{r['budget']:>9} {r['allocator']:>12}  {r['error']}")
            continue
        m = f"{r['perplexity']:>9.3f} {r['kl']:>8.4f}  " if measured else ""
        out.append(f"{r['budget']:>9} {r['allocator']:>12} {r['predicted_error']:>10.5g} {r['bits_per_weight']:>7.3f} "
                   f"{r['size_mib']:>9.2f} {r['solve_seconds']:>8.3f}  {m}{r['status']:<28} {r['plan_id']}")
    return "\n".join(out)


def _summary(o) -> dict:
    if isinstance(o, Profile):
        return {"id": o.id, "model": o.model.name, "estimator": o.estimator, "quantizer": o.quantizer.label,
                "modules": len(o.modules),
                "tokens": o.calibration.n_tokens, "created_at": o.created_at.isoformat(timespec="seconds")}
    if isinstance(o, Plan):
        return {"id": o.id, "profile_id": o.profile_id, "budget": o.budget, "allocator": o.allocator,
                "bits_per_weight": round(o.bits_per_weight, 4), "size_mib": round(o.size_mib, 2),
                "status": o.status}
    return {"id": o.id, "plan_id": o.plan_id, "perplexity": round(o.perplexity, 3), "corpus": o.corpus,
            "checkpoint": o.checkpoint}


def _find(store, id_or_prefix: str, kind: str):
    found, obj = store.find(id_or_prefix)
    if found != kind:
        raise_input(f"{id_or_prefix} is a {found}, not a {kind}")
    return obj


def _maybe_profile(store, pid):
    try:
        return store.get_profile(pid)
    except BitplanError:
        return None


def _read_json(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InvalidInput(f"{path} is not valid JSON: {e}") from e


def raise_input(msg: str):
    raise InvalidInput(msg)


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]



# ------------------------------------------------------------------------------------------ db copy


def _db_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("action", choices=["copy"],
                   help="copy: every profile, plan, evaluation and job of --from that --to lacks (run it again to "
                        "copy what was added since; stop the services writing to --from first)")
    c.add_argument("--from", dest="source", metavar="URL",
                   help="the database to copy from (default: --db, $BITPLAN_DB, or the user data dir's SQLite file)")
    c.add_argument("--to", dest="target", metavar="URL", required=True,
                   help="the database to copy into, e.g. postgresql://USER:PASSWORD@HOST/DB (migrated first)")


def cmd_db(args):
    from bitplan.db.store import Store, copy_store
    with Store(args.source or args.db) as source, Store(args.target) as target:
        counts = copy_store(source, target)
        where = {"from": source.url, "to": target.url}
    lines = [f"copied {where['from']} -> {where['to']}"]
    lines += [f"  {table:<18} {c['copied']:>7} copied  {c['present']:>7} there already" for table, c in counts.items()]
    _emit(args, {**where, "tables": counts}, "\n".join(lines))


# name, what it runs, its arguments, its help line
COMMANDS = [
    ("profile", cmd_profile, _profile_arguments, "measure every module's quantization error at every option; stores a Profile"),
    ("plan", cmd_plan, _plan_arguments, "choose an option for every module under a memory budget; stores a Plan"),
    ("compare", cmd_compare, _compare_arguments, "plan every budget with every allocator; stores every plan, prints a table"),
    ("apply", cmd_apply, _apply_arguments, "quantize the model with a stored plan and write the checkpoint"),
    ("eval", cmd_eval, _eval_arguments, "measure perplexity of a checkpoint on held-out text; stores an Evaluation"),
    ("ls", cmd_ls, _ls_arguments, "list stored profiles, plans and evaluations"),
    ("show", cmd_show, _show_arguments, "show one stored profile, plan or evaluation"),
    ("serve", cmd_serve, _serve_arguments, "start the HTTP service and its job workers (OpenAPI docs at /docs)"),
    ("worker", cmd_worker, _worker_arguments, "run queued jobs of the database (what `serve --workers` starts)"),
    ("demo", cmd_demo, _demo_arguments, "the main job: profile, plan (ilp and uniform), apply, reload, evaluate"),
    ("db", cmd_db, _db_arguments, "copy a store into another database (a SQLite file into PostgreSQL)"),
]


if __name__ == "__main__":
    sys.exit(main())
