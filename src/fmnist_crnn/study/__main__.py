"""``python -m fmnist_crnn.study``: run a study as queued DVC experiments, record each finished
run, compare.

``run`` plans every variant x seed, queues those without a record (``dvc exp run --queue``),
runs the queue and, while it runs, writes a record for each experiment that finishes. Run it
again with the same ``--study`` after an interruption: recorded runs are skipped, the rest are
queued again. ``compare`` rebuilds the table from the records alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fmnist_crnn.errors import ProjectError
from fmnist_crnn.study import catalog, cluster, comparison, publish, queue, records


def collect(study: str, out_dir: Path, commit: bool = False,
            experiment: str | None = None) -> list[str]:
    """Record every finished experiment of ``study`` that has no record yet (and commit each
    with the study's plan when ``commit``). ``experiment``: the MLflow experiment the runs log
    to; None reads it from params.yaml. A running study passes the one it read at its start,
    so an edit of params.yaml while its runs train (they train on their own copies) cannot
    stop the collection."""
    from fmnist_crnn.config import load_params

    # --all-commits: a study queued on an earlier commit stays visible after new commits.
    shown = json.loads(queue.dvc("exp", "show", "--json", "--all-commits"))
    done = {r["name"] for r in records.read_records(out_dir, study)}
    if all(r["name"] in done for r in records.collect_experiments(study, shown)):
        return []
    if experiment is None:
        experiment = load_params("params.yaml").tracking.experiment_name
    written = records.record_new(study, out_dir, shown, publish.study_runs(experiment, study))
    before = records.read_plan(out_dir, study).get("reference_before", {})
    for name in written:
        if name in before:
            records.set_reference(out_dir, study, [name], "before", before[name])
        print(f"recorded {name}", flush=True)
        if commit:
            commit_record(study, name, [records.runs_dir(out_dir, study) / f"{name}.json",
                                        records.plan_path(out_dir, study)])
    return written


def commit_record(study: str, name: str, paths: list[Path]) -> None:
    """Commit a record (and the study's plan) as it lands: a stop loses no finished run.
    The subject names the run within its study (``study S: record V-s42`` for the run
    ``S-V-s42``), so it stays short when the study's name is long; the body has the full name."""
    import subprocess

    names = [str(p) for p in paths]
    subject = f"study {study}: record {name.removeprefix(f'{study}-')}"
    add = subprocess.run(["git", "add", "--", *names], capture_output=True, text=True)
    done = add.returncode == 0 and subprocess.run(
        ["git", "commit", "-q", "-m", subject, "-m", f"Run: {name}", "--", *names],
        capture_output=True, text=True).returncode == 0
    if not done:
        print(f"warning: could not commit the record of {name}; it is written, commit it "
              "yourself", file=sys.stderr)


def run_recipe(recipe: str, name: str, seed: int | None) -> None:
    """``dvc exp run -n NAME -S ...`` in the workspace, built on the committed params.yaml
    (not on what an earlier recipe left there); says how to go back to the baseline."""
    extra = {"train.seed": seed} if seed is not None else {}
    overrides = {**catalog.committed_resets(Path.cwd()), **catalog.RECIPES[recipe], **extra}
    words = ["exp", "run", "-n", name, *catalog.override_args(overrides)]
    print("dvc " + " ".join(words), flush=True)
    queue.dvc(*words, capture=False)
    print(f"The workspace now holds the recipe '{recipe}' (params.yaml, dvc.lock, outputs; the "
          f"experiment is also kept as '{name}'). Back to the baseline: `git checkout "
          "params.yaml dvc.lock && dvc checkout`", flush=True)


def run_study(args: argparse.Namespace) -> Path:
    from fmnist_crnn import tracking
    from fmnist_crnn.config import load_params, parse_overrides

    params = load_params("params.yaml")
    out_dir = Path(args.out)
    study = args.study or datetime.now(UTC).strftime("study-%Y%m%d-%H%M")
    first = args.first_seed if args.first_seed is not None else params.train.seed
    seeds = [first + i for i in range(args.seeds)]
    extra: dict[str, Any] = {}
    if args.epochs:
        extra["train.epochs"] = args.epochs
    if args.limit:
        extra["split.limit"] = args.limit
    extra.update(parse_overrides(args.set))
    resets = catalog.committed_resets(Path.cwd())
    if resets:
        print(f"params.yaml differs from the commit in {', '.join(sorted(resets))}: every run "
              "of the study starts from the committed params.yaml (`git checkout params.yaml` "
              "drops the changes; commit them to study another baseline)", flush=True)
    # Seed-major order: if the queue is stopped early, every variant has the same seeds done.
    plan = {}
    for seed in seeds:
        for name in args.variants:
            variant = catalog.ALL_VARIANTS[name]
            plan[catalog.experiment_name(study, name, seed)] = {
                "variant": name, "seed": seed,
                "overrides": {**resets, **catalog.run_overrides(variant, seed, study, extra)}}
    if args.reference and (resets or args.scheduler):
        raise ProjectError("--reference times the default run in this workspace on the "
                           "committed params.yaml, beside runs on this machine: "
                           + ("params.yaml differs from the commit" if resets else
                              "with --scheduler the runs train on other machines"))
    records.add_to_plan(out_dir, study, plan)
    # Create the tracking store and experiment once, before parallel workers race to.
    experiment = params.tracking.experiment_name
    tracking.configure(experiment)
    collect(study, out_dir, experiment=experiment)
    done = {r["name"] for r in records.read_records(out_dir, study)}
    todo = [(name, catalog.override_args(spec["overrides"]))
            for name, spec in plan.items() if name not in done]
    print(f"study {study}: {len(plan)} planned, {len(plan) - len(todo)} recorded, "
          f"{len(todo)} to run")
    if todo and args.reference:
        before = queue.time_default_run()
        print(f"the default run trained in {before:.1f} s (the reference before)", flush=True)
        records.add_to_plan(out_dir, study, {}, reference_before={n: before for n, _ in todo})
    if todo and args.scheduler:
        def land(record: dict[str, Any]) -> None:
            path = records.write_record(out_dir, study, record)
            if path is not None:
                print(f"recorded {record['name']} ({record['worker']['host']})", flush=True)
                if args.commit:
                    commit_record(study, record["name"], [path, records.plan_path(out_dir,
                                                                                   study)])

        cluster.run_on_cluster(args.scheduler, study, todo, land, Path.cwd(), args.git_remote,
                               tracking.tracking_uri())
    elif todo:
        queue.queue_runs(todo)
        queue.start_workers(args.jobs)
        queue.wait(args.jobs, poll_s=args.poll,
                   on_finished=lambda: collect(study, out_dir, args.commit, experiment))
        collect(study, out_dir, args.commit, experiment)
    if todo and args.reference:
        after = queue.time_default_run()
        print(f"the default run trained in {after:.1f} s (the reference after)", flush=True)
        written = records.set_reference(out_dir, study, [n for n, _ in todo], "after", after)
        if written and args.commit:
            commit_record(study, f"references of {len(written)} run(s)", written)
    path = comparison.compare(study, out_dir)
    missing = comparison.missing_runs({"runs": plan}, records.read_records(out_dir, study))
    if missing:
        raise RuntimeError(f"{len(missing)} run(s) have no result: {', '.join(missing)}; "
                           + ("see the errors above" if args.scheduler else
                              "see `dvc queue logs <name>`")
                           + ", then run the same command again")
    return path


def publish_records(args: argparse.Namespace) -> None:
    """`publish`: the committed records in the store, and the link to the study's curves."""
    from fmnist_crnn import tracking
    from fmnist_crnn.config import load_params

    experiment = load_params("params.yaml").tracking.experiment_name
    done = publish.publish(Path(args.out), experiment, args.study)
    print(f"{sum(done.values())} committed run record(s) in {tracking.tracking_uri()}: "
          f"{done['added']} added, {done['replaced']} replaced, {done['unchanged']} "
          "unchanged (tagged imported=true; in the UI's search box: tags.imported = "
          "'true', or tags.study = 'ablation')")
    study_id = (args.study or ["ablation"])[0]
    experiment_id, runs = publish.imported_runs(experiment, study_id)
    first = sorted(runs)[:1]
    if first:  # one seed of every variant: the study's comparison in one click
        seed = first[0].rsplit("-s", 1)[-1]
        ids = [i for name, i in sorted(runs.items()) if name.endswith(f"-s{seed}")]
        print(f"{study_id}, seed {seed}, validation accuracy per epoch (`make ui`): "
              + publish.curves_url(args.ui, experiment_id, ids))


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per job."""
    parser = argparse.ArgumentParser(prog="python -m fmnist_crnn.study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="queue the variants, run the queue, record, compare")
    run.add_argument("--variants", nargs="+", default=list(catalog.VARIANTS),
                     choices=list(catalog.ALL_VARIANTS), metavar="VARIANT",
                     help="default: the study's ablations; the recipe's steps are "
                     f"{', '.join(catalog.RECIPE_VARIANTS)}; every variant, with its "
                     "command: `python -m fmnist_crnn.study commands`")
    run.add_argument("--seeds", type=int, default=1, help="seeds per variant (train.seed + i)")
    run.add_argument("--first-seed", type=int, help="first seed (default train.seed)")
    run.add_argument("--epochs", type=int, help="override train.epochs (cheap mode)")
    run.add_argument("--limit", type=int, help="override split.limit (cheap mode)")
    run.add_argument("--jobs", type=int, default=1, help="parallel DVC queue workers")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="extra override for every run, e.g. train.num_threads=1")
    run.add_argument("--study", help="study id (default: study-<UTC time>)")
    run.add_argument("--out", default="reports/study")
    run.add_argument("--scheduler", metavar="ADDRESS",
                     help="a Dask scheduler (tcp://HOST:8786): each run is one task on its "
                     "workers, in their own clones (docs/team.md); default: DVC's queue here")
    run.add_argument("--git-remote", default="origin",
                     help="the git remote workers clone from and push experiments to")
    run.add_argument("--no-commit", dest="commit", action="store_false",
                     help="write records without committing them (default: each record is "
                          "committed with the plan as it lands)")
    run.add_argument("--reference", action="store_true",
                     help="time the default run here right before the runs and right after "
                     "them (dvc repro -f -s train && dvc repro) and write both into each "
                     "record (make seeds does)")
    run.add_argument("--poll", type=float, default=300.0,
                     help="seconds between queue checks (each `dvc queue status` costs ~1 s "
                          "of CPU beside the runs being timed)")
    col = sub.add_parser("collect", help="record the study's finished experiments")
    cmp_ = sub.add_parser("compare", help="rebuild the comparison from the run records")
    for p in (col, cmp_):
        p.add_argument("--study", required=True)
        p.add_argument("--out", default="reports/study")
    pub = sub.add_parser("publish", help="load the committed run records into the MLflow "
                         "store (MLFLOW_TRACKING_URI, else the local one) as FINISHED runs "
                         "tagged imported=true; again: only changed records")
    pub.add_argument("--study", action="append", help="only this study (repeatable)")
    pub.add_argument("--out", default="reports/study")
    pub.add_argument("--ui", default="http://127.0.0.1:5000",
                     help="the MLflow UI's address, for the link printed at the end")
    lst = sub.add_parser("commands", help="print the one-line command for each variant")
    lst.add_argument("--epochs", type=int)
    res = sub.add_parser("rescore", help="score a finished study's models again with other "
                         "evaluate.* settings (test-time views), without training: one new "
                         "record per run, from its experiment commit and DVC's cache")
    res.add_argument("--from", dest="source", required=True, help="the study whose runs")
    res.add_argument("--study", required=True, help="the new study's id")
    res.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="an evaluate.* override, e.g. evaluate.tta_moves=diamond")
    res.add_argument("--out", default="reports/study")
    recipe = sub.add_parser("recipe", help="run a recipe as one named DVC experiment in the "
                            "workspace (`dvc exp run -n best -S ...`): "
                            f"{' or '.join(catalog.RECIPES)}")
    recipe.add_argument("recipe", choices=list(catalog.RECIPES))
    recipe.add_argument("--seed", type=int, help="train.seed (default: params.yaml's)")
    recipe.add_argument("--name", help="experiment name (default: the recipe's)")
    return parser


def rescore_study(args: argparse.Namespace) -> None:
    """`rescore`: the source study's models on other views, then the new study's table."""
    from fmnist_crnn.config import parse_overrides
    from fmnist_crnn.study.rescore import rescore

    out = Path(args.out)
    rescore(out, args.source, args.study, parse_overrides(args.set))
    comparison.compare(args.study, out)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            run_study(args)
        elif args.command == "collect":
            collect(args.study, Path(args.out))
        elif args.command == "publish":
            publish_records(args)
        elif args.command == "rescore":
            rescore_study(args)
        elif args.command == "compare":
            comparison.compare(args.study, Path(args.out))
        elif args.command == "recipe":
            run_recipe(args.recipe, args.name or args.recipe, args.seed)
        else:
            extra = {"train.epochs": args.epochs} if args.epochs else {}
            for variant in catalog.ALL_VARIANTS.values():
                overrides = catalog.scale_to_epochs(variant.overrides, args.epochs)
                print(f"{variant.name:12s} " + catalog.variant_command(
                    catalog.Variant(variant.name, "", overrides), extra))
    except (RuntimeError, ProjectError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
