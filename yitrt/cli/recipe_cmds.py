"""Commands `run` and `recipe list|show|validate|new` (registered on the main app by ``register``)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated

import typer

from yitrt.cli import render
from yitrt.cli.options import ForceOpt, JsonOpt
from yitrt.errors import UsageError, YitrtError

RecipeArg = Annotated[str, typer.Argument(help="A recipe file, or a built-in recipe's name (`yitrt recipe list`).", show_default=False)]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a recipe key, e.g. --set build.max_batch_size=64 (repeatable).", show_default=False)]
_MARKS = {"ran": "✓", "cached": "=", "reused": "=", "skipped": "-", "not-applicable": "-", "blocked": "!", "failed": "✗"}


def _progress(stage: str, kind: str) -> contextlib.AbstractContextManager:
    if kind == "bytes":
        return render.byte_progress(stage, True)
    if kind == "steps":
        return render.stage_progress(True)
    return render.phase_status(True)


def _stage_printer(shown: set[str]):
    """on_stage for humans: a line as each stage starts and ends; warnings not shown before (validation's)."""

    def show(report) -> None:
        if report.status == "running":
            render.err.print(f"[bold]▶ {report.stage}[/bold]", markup=True, highlight=False)
            return
        mark = _MARKS.get(report.status, "?")
        render.err.print(f"{mark} {report.stage:<8} {report.status:<14} {report.seconds:7.1f}s  {report.detail}", markup=False, highlight=False)
        for warning in report.warnings:
            if warning not in shown:
                shown.add(warning)
                render.warn(f"{report.stage}: {warning}")

    return show


def _summary_table(data: dict) -> None:
    rows = [[s["stage"], s["status"], f"{s['seconds']:.1f}s", s["artifact"] or "-", (s["digest"] or "-")[:12]] for s in data["stages"]]
    render.out.print(render.table(f"yitrt run {data['recipe']} → {data['work_dir']} ({data['seconds']:.1f}s)",
                                  ["stage", "status", "time", "artifact", "digest"], rows))


def register(app: typer.Typer) -> None:
    """Add `run` and the `recipe` group to ``app``."""

    @app.command()
    def run(
        recipe: RecipeArg,
        from_stage: Annotated[str | None, typer.Option("--from", help="Start at this stage (earlier artifacts come from an earlier run).", show_default=False)] = None,
        until_stage: Annotated[str | None, typer.Option("--until", help="Stop after this stage.", show_default=False)] = None,
        work_dir: Annotated[Path | None, typer.Option("--work-dir", help="Folder for every stage's artifact [default: yitrt-work/<recipe name>].", show_default=False)] = None,
        force: ForceOpt = False,
        set_: SetOpt = None,
        json_: JsonOpt = False,
    ) -> None:
        """Run a recipe: fetch → convert/quantize → verify → plan → build → deploy → smoke, each stage cached by its inputs.

        Stages: fetch, convert, verify, plan, build, deploy, smoke. Without TensorRT-LLM and a GPU it stops before
        build (exit 12) unless the recipe targets the CPU reference slot.
        """
        from yitrt.pipeline import RunFailed, RunOptions, prepare_work_dir, run_recipe, stage_range
        from yitrt.recipe import load_recipe

        stage_range(from_stage, until_stage)  # bad options are refused before the recipe's warnings are said
        loaded = load_recipe(recipe, set_ or [])
        work = work_dir or Path("yitrt-work") / loaded.spec.name
        prepare_work_dir(work)  # an unusable work folder is refused before anything else is said
        for warning in loaded.warnings:
            render.warn(warning)
        opts = RunOptions(work_dir=work, from_stage=from_stage, until_stage=until_stage, force=force,
                          progress=None if json_ else _progress,
                          on_stage=None if json_ else _stage_printer(set(loaded.warnings)))
        try:  # SIGTERM raises here (yitrt.cli.signals): the stage being run cleans its partial artifact and server
            report = run_recipe(loaded, opts)
        except RunFailed as exc:
            data = exc.report.to_json()
            if json_:
                render.emit_json(data)
            else:
                _summary_table(data)
            render.err.print(render.error_line(exc.cause), markup=False, highlight=False)
            sys.exit(exc.exit_code)
        data = report.to_json()
        if json_:
            render.emit_json(data)
            return
        _summary_table(data)
        did = data["did_work"]
        render.out.print("nothing to do: every stage is cached" if not did else f"did work: {', '.join(did)}")

    recipe_app = typer.Typer(help="Recipes: one YAML file per deployment (recipes/*.yaml are built in).", no_args_is_help=True,
                             add_completion=False)
    app.add_typer(recipe_app, name="recipe")

    @recipe_app.command("list")
    def recipe_list(json_: JsonOpt = False) -> None:
        """List the built-in recipes: model, GPU, precision, parallelism, engine."""
        from yitrt.recipe import builtin_recipes, load_recipe

        rows = []
        for name, path in builtin_recipes().items():
            spec = load_recipe(path, check_model=False).spec
            rows.append({"name": name, "path": str(path), "model": spec.model.repo or ("demo" if spec.model.demo else str(spec.model.path)),
                         "gpu": spec.target.gpu, "engine": spec.target.engine, "scheme": spec.precision.scheme,
                         "kv_cache": spec.precision.kv_cache, "tp": spec.parallelism.tp, "pp": spec.parallelism.pp,
                         "description": spec.description})
        if json_:
            render.emit_json({"recipes": rows})
            return
        render.out.print(render.table("Recipes (yitrt recipe show NAME)", ["name", "model", "GPU", "precision", "tp×pp", "engine"], [
            [r["name"], r["model"], r["gpu"], r["scheme"] + (f" + {r['kv_cache']} KV" if r["kv_cache"] else ""), f"{r['tp']}×{r['pp']}",
             r["engine"]] for r in rows]))

    @recipe_app.command("show")
    def recipe_show(
        recipe: RecipeArg,
        resolved: Annotated[bool, typer.Option("--resolved", help="Show the resolved recipe (defaults filled in) instead of the file.")] = False,
        set_: SetOpt = None,
        json_: JsonOpt = False,
    ) -> None:
        """Print a recipe file (with its comments), or the resolved recipe."""
        import yaml

        from yitrt.recipe import load_recipe

        loaded = load_recipe(recipe, set_ or [], check_model=False)
        if json_:
            render.emit_json({"path": str(loaded.path), "recipe": loaded.spec.resolved()})
        elif resolved or set_:
            render.out.print(yaml.safe_dump(loaded.spec.resolved(), sort_keys=False), markup=False, highlight=False, end="")
        else:
            render.out.print(loaded.path.read_text(), markup=False, highlight=False, end="")

    @recipe_app.command("validate")
    def recipe_validate(
        recipes: Annotated[list[str] | None, typer.Argument(help="Recipe files or built-in names [default: every built-in recipe].", show_default=False)] = None,
        set_: SetOpt = None,
        json_: JsonOpt = False,
    ) -> None:
        """Check recipes whole, without downloading weights: schema, rules, sharding, and the plan on the target GPU."""
        from yitrt.recipe import builtin_recipes, load_recipe

        results, failed = [], None
        for ref in recipes or list(builtin_recipes()):
            try:
                loaded = load_recipe(ref, set_ or [])
            except YitrtError as exc:
                failed = failed or exc
                results.append({"recipe": ref, "valid": False, "problems": getattr(exc, "problems", [exc.message]), "hint": exc.hint})
                continue
            cand = (loaded.plan or {}).get("candidates", [{}])[0]
            plan = cand.get("plan") or {}
            results.append({"recipe": ref, "path": str(loaded.path), "valid": True, "warnings": loaded.warnings,
                            "fits": cand.get("fits"), "max_concurrent": plan.get("max_concurrent_sequences"),
                            "weights_per_gpu_gb": round(plan["ranks"][0]["weight_bytes"] / 1e9, 2) if plan.get("ranks") else None,
                            "limits": plan.get("build_limits")})
        if json_:
            render.emit_json({"ok": failed is None, "recipes": results})
        else:
            for r in results:
                if r["valid"]:
                    render.out.print(f"✓ {r['recipe']}: valid; fits, {r['max_concurrent']} concurrent sequences, "
                                     f"{r['weights_per_gpu_gb']} GB weights per GPU, limits {r['limits']}", markup=False, highlight=False)
                    for warning in r["warnings"]:
                        render.warn(f"{r['recipe']}: {warning}")
                else:
                    render.out.print(f"✗ {r['recipe']}: {len(r['problems'])} problem(s)", markup=False, highlight=False)
                    for problem in r["problems"]:
                        render.out.print(f"    - {problem}", markup=False, highlight=False)
        if failed is not None:
            bad = [r["recipe"] for r in results if not r["valid"]]
            head = failed if len(bad) == 1 else UsageError(f"{len(bad)} of {len(results)} recipes are invalid: {', '.join(bad)}", failed.hint)
            sys.stderr.write(render.error_line(head) + "\n")  # the one stderr line (the problems are on stdout)
            sys.exit(failed.exit_code)

    @recipe_app.command("plan")
    def recipe_plan(recipe: RecipeArg, set_: SetOpt = None, json_: JsonOpt = False) -> None:
        """The `yitrt plan` report of a recipe's configuration on its target GPU (no weights downloaded)."""
        from yitrt.cli import render_plan
        from yitrt.recipe import load_recipe

        loaded = load_recipe(recipe, set_ or [])
        if json_:
            render.emit_json(loaded.plan)
            return
        render_plan.plan_report(loaded.plan)

    @recipe_app.command("new")
    def recipe_new(
        out: Annotated[Path, typer.Argument(help="The recipe file to write.", show_default=False)],
        from_: Annotated[str, typer.Option("--from", help="Built-in recipe to start from (`yitrt recipe list`).")] = "demo",
        name: Annotated[str | None, typer.Option("--name", help="The new recipe's name [default: the file name].", show_default=False)] = None,
        force: ForceOpt = False,
    ) -> None:
        """Copy a built-in recipe out for editing (comments kept; `name:` set to the new file's)."""
        import re

        from yitrt.recipe import builtin_recipes
        from yitrt.userfiles import check_name

        source = builtin_recipes().get(from_)
        if source is None:
            raise UsageError(f"no built-in recipe {from_!r}", "`yitrt recipe list` names them")
        if out.exists() and not force:
            raise UsageError(f"{out} exists", "choose another file, or pass --force to replace it")
        new_name = name or out.name.removesuffix(".yaml").removesuffix(".yml")
        check_name(new_name, "recipe name")
        text, count = re.subn(r"(?m)^name:.*$", f"name: {new_name}", source.read_text(), count=1)
        if not count:
            text = f"name: {new_name}\n" + text
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(text)
        tmp.replace(out)
        render.out.print(f"{out}: copied from {from_} (edit it, then `yitrt recipe validate {out}`)")

