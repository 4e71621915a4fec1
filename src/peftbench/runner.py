"""A study, start to end: validate -> load and split data -> tokenize once -> plan runs -> execute ->
summarise.

Runs are planned as data (one `spec.json` each) and executed by `worker.execute_run`, by default in a
fresh process per run: a crash, CUDA error or out-of-memory in one run is recorded and the study goes
on, and no run's memory is polluted by the one before it. With `lr_search`, trial runs (validation
only) pick each method's learning rate; final runs (every seed) are the only ones scored on test. A
method's trials share one process that keeps its model and CUDA graphs (`warm_trials`, `WarmWorker`).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import methods as registry
from . import store
from .spec import Runtime, RunSpec, TrainSettings, config_hash
from .errors import UserError, silent_interrupt
from .metrics import ranking, validation_at


# Part of every run's identity: raised when a change to the training path changes what a run measures,
# so that results of the older code are redone, never reused (2: bf16 frozen bases, the memory planner).
RESULTS_VERSION = 2

# Training texts a second on a CPU: all-MiniLM-L6-v2 (22.7M parameters) at 128 tokens trained its
# 600 x 2 epochs in 49-58 s a run on a 2-core machine (`make demo`, 2026-12-04, commit 32749aa). More
# cores are faster; longer texts and larger models slower.
CPU_TEXTS_PER_SECOND = 20


def lr_grid(center: float, points: int, decades: float) -> list[float]:
    """`points` log-spaced learning rates spanning `decades` decades centred on `center`."""
    exps = np.linspace(-decades / 2, decades / 2, points)
    return [float(f"{center * 10**e:.3g}") for e in exps]


def run_id(label: str, role: str, lr: float | None, seed: int) -> str:
    lr_part = f"lr{lr:.2e}" if lr is not None else "nolr"
    return f"{registry.safe_label(label)}-{'trial' if role == 'trial' else 'final'}-{lr_part}-s{seed}"


class Study:
    """A validated study bound to an output folder."""

    def __init__(self, study: dict, out_dir: Path, folder_note: str | None = None):
        self.cfg = study
        self.out = Path(out_dir)
        self.folder_note = folder_note  # why the CLI chose this folder; said once the checks pass
        self.device = None
        self.tok_file = None
        self.data = None
        self.model_path = None
        self.pad_token_id = None
        self.max_positions = None
        self.tokenizer_note = None  # a warning about the tokenizer's unknown tokens, for the report too
        self.model_fingerprint = None
        self.search_wall_seconds = None
        # Where the command's start went, step by step (seconds), and when the runs could begin (epoch s)
        self.prepare_seconds: dict[str, float] = {}
        self.prepared_at: float | None = None
        self.warm_workers: dict[str, WarmWorker] = {}  # by chain name: they live on from rung to rung
        self.mps_env: dict[str, str] = {}  # what makes a run a client of the study's MPS daemon
        self.mps: str | None = None  # "started" or "already running" where the runs were MPS clients
        self.cache_env = compiler_caches(self.out)
        self.stopping = threading.Event()  # set when the study is interrupted: no run starts after it

    # ---------------------------------------------------------------- preparation (no model loaded)
    def prepare(self) -> None:
        """Check the model config and data, then tokenize every split once for the whole study; then say
        `folder_note`."""
        self._check_and_tokenize()
        self.prepared_at = time.time()
        if self.folder_note:
            print(f"peftbench: {self.folder_note}", file=sys.stderr)

    def _check_and_tokenize(self) -> None:
        from . import data as data_mod
        from . import models
        from .devices import resolve_device

        cfg = self.cfg
        self.model_path = models.resolve(cfg["model"])
        self._timed("data", self._load_data)  # before torch's import: a wrong path is said at once
        self.device = self._timed("device", resolve_device, cfg["device"])
        needs_model = any(registry.get(m["name"]).kind != "tfidf" for m in cfg["methods"])
        if not needs_model:
            return
        mconf = self._timed("model_config", models.load_config, self.model_path, cfg["trust_remote_code"])
        models.check_weights_format(self.model_path, cfg["allow_pickle"])
        self.max_positions = models.max_positions(mconf)
        max_len = cfg["train"]["max_length"]
        if self.max_positions and max_len > self.max_positions:
            raise UserError(
                f"train.max_length {max_len} exceeds what model '{cfg['model']}' accepts "
                f"({self.max_positions} positions); lower it"
            )
        for m in cfg["methods"]:
            meth = registry.get(m["name"])
            if meth.has_targets:
                opts = {**meth.options, **m["options"]}
                if "target_modules" not in opts:
                    registry.targets_regex(mconf.model_type, opts.get("targets", []))
        tokenizer = self._timed("tokenizer", models.load_tokenizer, self.model_path, cfg["trust_remote_code"])
        self.pad_token_id = tokenizer.pad_token_id
        self.model_fingerprint = models.fingerprint(self.model_path)
        key = config_hash(
            [
                self.model_path,
                self.model_fingerprint,
                max_len,
                self.data.fingerprint,
                type(tokenizer).__name__,
                len(tokenizer),
            ]
        )
        self.tok_file = self.out / ".cache" / f"tokens-{key}.npz"
        tok = self._timed("tokenize", self._tokens, tokenizer, max_len)
        self.tokenizer_note = data_mod.check_unknown_tokens(tok, tokenizer, cfg["model"])
        if self.tokenizer_note:
            print(f"peftbench: warning: {self.tokenizer_note}", file=sys.stderr)

    def _load_data(self) -> None:
        """Load and check the data, and warn of what would make its scores misleading."""
        from . import data as data_mod

        cfg, data = self.cfg, data_mod.load(self.cfg["data"], self.cfg["task"])
        if cfg["metric"] in ("mcc", "f1_positive") and len(data.label_names) != 2:
            raise UserError(
                f"metric: {cfg['metric']} needs two classes, the data have {len(data.label_names)}; "
                "use accuracy or macro_f1"
            )
        self.data = data
        notes = data_mod.data_notes(
            cfg["task"],
            cfg["metric"],
            data.labels["test"],
            data.label_names,
            data.source["overlap"],
            data.sizes(),
            data.source.get("label_words"),
        )
        for note in notes:
            print(f"peftbench: warning: {note}", file=sys.stderr)

    def _timed(self, step: str, fn, *args):
        """`fn(*args)`, its wall seconds recorded as `step` of the preparation (study.json's
        `prepare_seconds`)."""
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.prepare_seconds[step] = round(time.perf_counter() - t, 3)

    def _tokens(self, tokenizer, max_len: int):
        """Every split's tokens: from the study's cache, or tokenized now and cached."""
        from . import data as data_mod

        tok = self._cached_tokens()
        if tok is None:
            tok = data_mod.tokenize(self.data, tokenizer, max_len, data_mod.is_pair(self.cfg["data"]))
            tok.save(self.tok_file)
        return tok

    def _cached_tokens(self):
        """The token cache if it is there and readable; a damaged one is moved aside (and rebuilt)."""
        from .data import Tokenized

        if not self.tok_file.exists():
            return None
        try:
            return Tokenized.load(self.tok_file)
        except Exception as e:  # a truncated or corrupt .npz: zipfile, numpy and key errors alike
            aside = self.tok_file.with_name(f"{self.tok_file.name}.corrupt-{int(time.time())}")
            os.replace(self.tok_file, aside)
            print(
                f"peftbench: warning: the token cache {self.tok_file.name} was damaged ({type(e).__name__}); "
                f"moved to {aside.name}, rebuilding it",
                file=sys.stderr,
            )
            return None

    def truncated_counts(self) -> dict | None:
        """Per split, how many texts reached max_length and were cut (long texts are truncated, not
        errors)."""
        if self.tok_file is None:
            return None
        from .data import Tokenized

        return Tokenized.load(self.tok_file).truncated

    def _test_rows_file(self) -> Path:
        """The test split's source rows, text hashes and labels: what each run's predictions.parquet is
        keyed by."""
        path = self.out / ".cache" / f"test-rows-{self.data.fingerprint}.parquet"
        if not path.exists():
            import pandas as pd

            from . import data as data_mod
            from .artefacts import text_sha1

            path.parent.mkdir(parents=True, exist_ok=True)
            df = pd.DataFrame(
                {
                    "row": self.data.rows["test"],
                    "text_sha1": [text_sha1(t) for t in self.data.texts["test"]],
                    "label": data_mod.readable_labels(self.data.labels["test"], self.data.label_names),
                }
            )
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            df.to_parquet(tmp, index=False)
            os.replace(tmp, path)
        return path

    def _texts_file(self) -> Path:
        path = self.out / ".cache" / f"texts-{self.data.fingerprint}.json"
        if not path.exists():
            store.atomic_write_json(
                path,
                {"texts": self.data.texts, "labels": {k: v.tolist() for k, v in self.data.labels.items()}},
            )
        return path

    # ---------------------------------------------------------------- planning
    def run_spec(self, entry: dict, lr: float | None, seed: int, role: str) -> RunSpec:
        cfg = self.cfg
        method = registry.get(entry["name"])
        opts, _ = registry.split_options(method, entry["options"])
        train = {**self.train_settings(entry), "learning_rate": lr}
        if role == "trial" and cfg["lr_search"]["schedule"] == "halving":
            train["epochs"] = halving_rungs(cfg["lr_search"], train["epochs"])[-1][0]
        virtual = opts.get("num_virtual_tokens", 0) if method.takes_positions else 0
        world = cfg["gpus_per_run"]
        eff = None
        if virtual and self.max_positions and train["max_length"] + virtual > self.max_positions:
            eff = self.max_positions - virtual  # soft prompts and prefixes take positions too
        return RunSpec(
            study=cfg["name"],
            model=cfg["model"],
            model_path=self.model_path,
            method=method.name,
            label=entry["label"],
            method_options=opts,
            train=TrainSettings(**train),
            seed=seed,
            learning_rate=lr,
            role=role,
            evaluate_test=role == "final",
            data=dict(cfg["data"]),
            data_fingerprint=self.data.fingerprint,
            data_sizes=self.data.sizes(),
            data_origin=self.data.source.get("origin"),
            label_names=self.data.label_names,
            task=cfg["task"],
            metric=cfg["metric"],
            device_type=self.device.split(":")[0],
            model_fingerprint=self.model_fingerprint,
            pad_token_id=self.pad_token_id,
            effective_max_length=eff,
            trust_remote_code=cfg["trust_remote_code"],
            allow_pickle=cfg["allow_pickle"],
            world_size=world,
            gpu_memory_bytes=self.gpu_memory_bytes(),
            results_version=RESULTS_VERSION,
            runtime=Runtime(
                run_id=run_id(entry["label"], role, lr, seed),
                device=self.device,
                tokens_file=str(self.tok_file) if self.tok_file else None,
                texts_file=str(self._texts_file()) if method.kind == "tfidf" else None,
                test_rows_file=str(self._test_rows_file()),
                max_oom_retries=cfg["max_oom_retries"],
                checkpoint_every_seconds=cfg["checkpoint_every_seconds"],
                isolation=cfg["isolation"],
                executor=cfg["executor"],
                tracking=cfg["tracking"],
                tracking_every=cfg["tracking_every"],
                profile=cfg["profile"],
                concurrent_runs=self.at_once(role),
                warm=role == "trial" and cfg["warm_trials"] and cfg["executor"] == "local" and world == 1,
            ),
        ).planned()

    def train_settings(self, entry: dict) -> dict:
        """The study's `train:` section with a method entry's overrides."""
        _, overrides = registry.split_options(registry.get(entry["name"]), entry["options"])
        return {**self.cfg["train"], **overrides}

    def gpu_budget_unapplied(self) -> bool:
        """A GPU memory budget on a study without a GPU: runs do not apply it, `plan` estimates it."""
        return self.cfg["gpu_memory"] is not None and not self.device.startswith("cuda")

    def gpu_memory_bytes(self) -> int | None:
        """The study's GPU memory budget in bytes; None without one (and on the CPU, where it means
        nothing)."""
        if self.cfg["gpu_memory"] is None or not self.device.startswith("cuda"):
            return None
        from .memory import parse_size

        return parse_size(self.cfg["gpu_memory"], "gpu_memory")

    def default_lr(self, entry: dict) -> float | None:
        method = registry.get(entry["name"])
        if method.learning_rate is None:
            return None
        return (
            entry["options"].get("learning_rate")
            or self.cfg["train"]["learning_rate"]
            or method.learning_rate
        )

    def trial_specs(self) -> list[RunSpec]:
        s = self.cfg["lr_search"]
        if not s:
            return []
        first = s["seed"] if s["seed"] is not None else self.cfg["seeds"][0]
        seeds = [first + k for k in range(s.get("seeds", 1))]
        specs = []
        for entry in self.cfg["methods"]:
            lr0 = self.default_lr(entry)
            if lr0 is None:
                continue
            grid = lr_grid(lr0, s["points"], s["decades"])
            if len(set(grid)) < len(grid) or not all(0 < lr < float("inf") for lr in grid):
                raise UserError(
                    f"lr_search: {s['points']} points over {s['decades']} decades around {lr0:g} give "
                    f"{grid}: repeated or degenerate rates; use fewer points or more decades"
                )
            specs += [self.run_spec(entry, lr, seed, "trial") for lr in grid for seed in seeds]
        return specs

    def final_specs(self, chosen: dict[str, float | None]) -> list[RunSpec]:
        return [
            self.run_spec(e, chosen.get(e["label"], self.default_lr(e)), seed, "final")
            for e in self.cfg["methods"]
            for seed in self.cfg["seeds"]
        ]

    # ---------------------------------------------------------------- execution
    def execute(self, specs: list[RunSpec], desc: str) -> list[dict]:
        """Run every spec not already done; returns all their results (in spec order)."""
        todo, done, other = [], {}, []
        for spec in specs:
            rdir = self.out / "runs" / spec.runtime.run_id
            old = store.read_result(rdir / "result.json")
            if _already_done(old, spec):
                done[spec.runtime.run_id] = old
            else:
                todo.append(spec)
                if old and old.get("config_hash") != spec.config_hash:
                    other.append(rdir)
        if done:
            print(
                f"peftbench: {len(done)} of {len(specs)} {desc} runs already done, skipped", file=sys.stderr
            )
        if other:
            kept = store.archive_runs(self.out, other)
            print(
                f"peftbench: {len(other)} {desc} run(s) hold results made under other settings (a changed "
                f"study file, data or peftbench version); they run again, and their earlier results move to "
                f"{kept}",
                file=sys.stderr,
            )
        from tqdm.auto import tqdm

        # A live bar on a terminal; elsewhere (CI logs, pipes) only the line each finished run prints.
        bar = tqdm(
            total=len(todo),
            desc=desc,
            unit="run",
            dynamic_ncols=True,
            disable=not todo or not sys.stderr.isatty(),
        )
        parallel = self.concurrency(specs)
        chains = self.chains(todo, parallel)
        extra_env = {**self.thread_env(min(parallel, len(chains))), **self.mps_env}

        def finished(res):
            bar.update(1)
            bar.write(_one_line(res))
            return res

        def chain(named):
            key, specs = named
            if key is not None:
                return self._execute_chain(key, specs, parallel == 1, finished, extra_env)
            if self.stopping.is_set():
                return []
            return [finished(self._execute_one(specs[0], parallel == 1, extra_env))]

        try:  # the bar is closed (its line ended) before any error is printed
            if self.cfg["executor"] == "ray" and todo:
                new = self._execute_ray(todo, finished)
            elif parallel > 1 and len(chains) > 1:
                new = self._in_threads(chain, chains, parallel)
            else:
                new = [r for c in chains for r in chain(c)]
        finally:
            bar.close()
        done.update({r["run_id"]: r for r in new})
        return [done[s.runtime.run_id] for s in specs]

    def _in_threads(self, chain, chains: list, parallel: int) -> list[dict]:
        """`chain` over `chains`, `parallel` at a time. Interrupted (or failed), it returns at once: queued
        chains are cancelled and running ones start no further run (`stopping`); the CLI kills the runs in
        progress."""
        pool = ThreadPoolExecutor(parallel)
        try:
            new = [r for rs in pool.map(chain, chains) for r in rs]
        except BaseException:
            self.stopping.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        return new

    def thread_env(self, at_once: int) -> dict[str, str]:
        """Runs sharing this machine's CPU cores, `at_once` at a time: OMP_NUM_THREADS of each run's worker,
        its share of the cores, unless the user set it. Otherwise each run's torch starts a thread per core,
        and the threads, outnumbering the cores, wait on each other: the starting study's four methods at
        once on a 2-core CPU (200 reviews of 64 tokens) trained 234-385 s each with 2 threads a run, 44-76 s
        with 1, and 14-28 s (full, LoRA) one at a time."""
        if at_once < 2 or not self.device.startswith("cpu") or "OMP_NUM_THREADS" in os.environ:
            return {}
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return {"OMP_NUM_THREADS": str(max(1, cores // at_once))}

    def concurrency(self, specs: list[RunSpec]) -> int:
        """Runs at once among `specs` (`at_once`: of finals, if they hold any)."""
        return self.at_once("final" if any(s.role == "final" for s in specs) else "trial")

    def at_once(self, role: str) -> int:
        """Runs of `role` at once: `parallel`, except final runs when `exclusive_finals` asks for clean
        timings."""
        return 1 if role == "final" and self.cfg["exclusive_finals"] else self.cfg["parallel"]

    def chains(self, todo: list[RunSpec], parallel: int) -> list[tuple[str | None, list[RunSpec]]]:
        """The runs each worker process runs, in order, with the name of its warm worker: warm trials of one
        method together (halved while there are fewer chains than runs at once), every other run alone
        in a process of its own (None)."""
        warm: dict[str, list[RunSpec]] = {}
        alone: list[tuple[str | None, list[RunSpec]]] = []
        for spec in todo:
            if spec.runtime.warm and self.cfg["isolation"] == "process":
                warm.setdefault(spec.warm_key(), []).append(spec)
            else:
                alone.append((None, [spec]))
        chains = list(warm.items())
        while len(chains) + len(alone) < parallel and max((len(c) for _, c in chains), default=1) > 1:
            key, longest = max(chains, key=lambda kc: len(kc[1]))
            chains.remove((key, longest))
            chains += [(key, longest[: len(longest) // 2]), (key, longest[len(longest) // 2 :])]
        count: dict[str, int] = {}
        named = []
        for key, chain in chains:
            count[key] = count.get(key, -1) + 1
            named.append((f"{key}-{count[key]}", chain))
        return named + alone

    def _execute_chain(
        self, key: str, chain: list[RunSpec], progress: bool, on_done, extra_env: dict
    ) -> list[dict]:
        """Warm trials, one after another in the warm worker process of `key` (kept for the next rung),
        which `extra_env` adds to the environment when it starts; each with this rung's thread share."""
        if key not in self.warm_workers:
            self.warm_workers[key] = WarmWorker(progress, extra_env)
        worker = self.warm_workers[key]
        threads = int(extra_env["OMP_NUM_THREADS"]) if "OMP_NUM_THREADS" in extra_env else None
        results = []
        for spec in chain:
            if self.stopping.is_set():
                break
            rdir = self._prepare_run_dir(spec)
            launched = time.time()
            code = worker.run(rdir, spec.runtime.device.startswith("cuda"), threads)
            results.append(on_done(collect(spec, rdir, code, launched)))
        return results

    def close_warm_workers(self, wait: bool = True) -> None:
        for worker in self.warm_workers.values():
            worker.close(wait)
        self.warm_workers.clear()

    def _execute_one(self, spec: RunSpec, progress: bool, extra_env: dict) -> dict:
        rdir = self._prepare_run_dir(spec)
        if self.cfg["isolation"] == "inline":
            from .worker import execute_run

            return execute_run(rdir, progress=progress)
        launched = time.time()
        return collect(spec, rdir, launch_worker(str(rdir), progress, extra_env), launched)

    def _prepare_run_dir(self, spec: RunSpec) -> Path:
        rdir = self.out / "runs" / spec.runtime.run_id
        rdir.mkdir(parents=True, exist_ok=True)
        store.atomic_write_json(rdir / "spec.json", spec.to_dict())
        return rdir

    def _execute_ray(self, todo: list[RunSpec], on_done) -> list[dict]:
        """Every run goes to a Ray actor holding one run's resources (one GPU each on CUDA, `ray_cpus_per_run`
        CPUs otherwise), as many actors as the cluster has room for when the study starts.

        An actor runs the same worker process as the local executor, forked from the actor's own preloaded
        forkserver, so crash isolation and result files are the same and only an actor's first run pays for
        importing torch and transformers. A run whose actor dies is retried once on a new actor, then
        recorded as failed. The study folder must be on storage the Ray nodes share (the token cache and
        spec files are read there).
        """
        try:
            import ray
        except ImportError:
            raise UserError("executor: ray needs the ray package; pip install 'peftbench[ray]'") from None
        if not ray.is_initialized():
            address = self.cfg["ray_address"]
            _check_reachable(address)
            try:
                ray.init(
                    address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True
                )
            except (ConnectionError, ValueError) as e:
                raise UserError(
                    f"cannot connect to the Ray cluster at {address!r} ({str(e).splitlines()[0][:150]}); "
                    + RAY_ADDRESS_HINT
                ) from None
        cpus = self.cfg["ray_cpus_per_run"]
        n = self.cfg["gpus_per_run"]
        cuda = self.device.startswith("cuda")
        opts = {"num_gpus": n, "num_cpus": n} if cuda else {"num_cpus": cpus * n}
        have = ray.cluster_resources().get("GPU" if cuda else "CPU", 0)
        room = int(have // (n if cuda else cpus * n))
        if room < 1:
            what = f"{n} GPU(s)" if cuda else f"{cpus * n} CPU(s)"
            raise UserError(
                f"the Ray cluster has {have:g} {'GPUs' if cuda else 'CPUs'} but each run needs {what}; "
                "connect to a bigger cluster (--address) or lower gpus_per_run / ray_cpus_per_run"
            )
        slot = ray.remote(max_restarts=0)(RunSlot).options(**opts)
        env = {k: v for k, v in os.environ.items() if k.startswith(("PEFTBENCH_", "HF_", "TRANSFORMERS_"))}
        env.setdefault("OMP_NUM_THREADS", str(cpus))
        env.update(self.cache_env)
        launched = time.time()
        idle = [slot.remote() for _ in range(min(room, len(todo)))]
        actors = list(idle)
        queue, running, out, died = list(todo), {}, {}, set()
        while queue or running:
            while idle and queue:
                spec, actor = queue.pop(0), idle.pop()
                running[actor.run.remote(str(self._prepare_run_dir(spec)), env)] = (actor, spec)
            (ref,), _ = ray.wait(list(running), num_returns=1)
            actor, spec = running.pop(ref)
            rdir = self.out / "runs" / spec.runtime.run_id
            try:
                returncode, remote = ray.get(ref)
                idle.append(actor)
                if remote is not None and store.read_result(rdir / "result.json") is None:
                    store.atomic_write_json(rdir / "result.json", remote)  # a node without the shared folder
                result = collect(spec, rdir, returncode, launched)
            except ray.exceptions.RayError as e:
                dead = isinstance(e, ray.exceptions.RayActorError)
                if dead:  # its place goes to a fresh actor
                    actor = slot.remote()
                    actors.append(actor)
                idle.append(actor)
                if dead and spec.runtime.run_id not in died:
                    died.add(spec.runtime.run_id)
                    queue.insert(0, spec)
                    continue
                import re

                first = re.sub(r"\x1b\[[0-9;]*m", "", str(e).splitlines()[0] if str(e) else "")[:200]
                why = "its Ray actor died twice" if dead else "the Ray call failed"
                result = record_failure(spec, rdir, f"{why}: {type(e).__name__}: {first}")
            out[spec.runtime.run_id] = result
            on_done(result)
        with contextlib.suppress(Exception):  # an actor that died has nothing left to remove
            ray.get([a.close.remote() for a in actors], timeout=30)
        for a in actors:
            ray.kill(a)
        return [out[s.runtime.run_id] for s in todo]

    # ---------------------------------------------------------------- the whole study
    def run(self, force: bool = False, while_training=None) -> list[dict]:
        """The whole study. study.json is written before any run and again as the plan grows, so a report of
        an interrupted study shows this study's runs and lists the ones still missing. `while_training`, a
        function, runs in a background thread once the runs start, when this process only waits on them."""
        with self.in_folder(force, start_forks=True):
            t0 = time.perf_counter()
            self.prepare()
            if self.gpu_budget_unapplied():
                print(
                    f"peftbench: note: gpu_memory {self.cfg['gpu_memory']} is a GPU budget and this study "
                    f"runs on {self.device}: it is not applied (`peftbench plan` estimates what fits in it)",
                    file=sys.stderr,
                )
            with self.mps_for_runs():
                return self._run_runs(t0, while_training)

    def _run_runs(self, t0: float, while_training) -> list[dict]:
        trials = self.trial_specs()
        self.write_plan(trials, self.final_specs({}) if not trials else [], {}, complete=False)
        print(f"peftbench: {self.workload(len(trials))}", file=sys.stderr)
        if while_training is not None:
            threading.Thread(target=while_training, name="peftbench-while-training", daemon=True).start()
        chosen: dict[str, float | None] = {}
        trial_results, search = [], {}
        if trials:
            t = time.perf_counter()
            trial_results, chosen, search = self.search(trials)
            self.search_wall_seconds = time.perf_counter() - t
        finals = self.final_specs(chosen)
        self.write_plan(trials, finals, chosen, complete=False, search=search)
        final_results = self.execute(finals, "study")
        self.write_plan(
            trials, finals, chosen, complete=True, wall_seconds=time.perf_counter() - t0, search=search
        )
        return trial_results + final_results

    @contextlib.contextmanager
    def mps_for_runs(self):
        """NVIDIA MPS for the study's runs (`devices.mps_daemon`) where `mps` asks for it and runs share a
        GPU; where it asks and they do not, a note that says why it is not started."""
        why_not = self.mps_unapplied() if self.cfg["mps"] else None
        if why_not:
            print(f"peftbench: note: mps is not started: {why_not}", file=sys.stderr)
        if not self.cfg["mps"] or why_not:
            yield
            return
        from .devices import mps_daemon

        with mps_daemon() as env:
            self.mps_env, self.mps = env, "started" if env else "already running"
            try:
                yield
            finally:
                self.mps_env = {}

    def mps_unapplied(self) -> str | None:
        """Why MPS would change nothing for this study's runs, or None where runs share a GPU."""
        if not self.device.startswith("cuda"):
            return f"the runs are on the {self.device.upper()}"
        if self.cfg["executor"] != "local" or self.cfg["isolation"] != "process":
            return "it serves runs in processes of their own here (isolation: process, executor: local)"
        roles = ["final", "trial"] if self.cfg["lr_search"] else ["final"]
        if max(self.at_once(role) for role in roles) < 2:
            return "the runs go one at a time (--parallel N; --concurrent-finals for final runs)"
        return None

    def workload(self, n_trials: int) -> str:
        """What the study is about to train, in one line, before it starts: runs, texts, epochs, device; on
        the CPU, where that is half an hour or more at CPU_TEXTS_PER_SECOND, how long, and the assumption."""
        sizes, labels = self.data.sizes(), [e["label"] for e in self.cfg["methods"]]
        epochs = sorted({self.train_settings(e)["epochs"] for e in self.cfg["methods"]})
        finals = len(labels) * len(self.cfg["seeds"])
        where = "the CPU" if self.device == "cpu" else self.device
        search = f"{n_trials} learning-rate trial runs, then " if n_trials else ""
        text = (
            f"{self.cfg['name']}: {search}{finals} final runs ({', '.join(labels)}; "
            f"{len(self.cfg['seeds'])} seed(s)), each training on "
            f"{sizes['train']:,} texts for {'/'.join(map(str, epochs))} epoch(s), validating on "
            f"{sizes['validation']:,} and testing on {sizes['test']:,}, on {where}"
        )
        hours = finals * sizes["train"] * max(epochs) / CPU_TEXTS_PER_SECOND / 3600
        if self.device == "cpu" and hours >= 0.5:
            text += (
                f"; at {CPU_TEXTS_PER_SECOND} texts a second (MiniLM at 128 tokens on 2 CPU cores) that is "
                f"{hours:.1f} hours of training (--train-size and --test-size make a quicker study)"
            )
        return text

    def search(self, trials: list[RunSpec]) -> tuple[list[dict], dict, dict]:
        """The learning-rate search: its trial results, the rate chosen per method label, and per label how
        it was chosen (the halving rungs) and what it cost (seconds of training and validation, summed
        over its runs) beside what the full grid cost or would have cost."""
        try:
            if self.cfg["lr_search"]["schedule"] == "halving":
                results, chosen, rungs = self.halving(trials)
            else:
                results, rungs = self.execute(trials, "lr search"), {}
                chosen = select_learning_rates(results, self.cfg["metric"])
        except BaseException:  # interrupted, or failed: a worker's run in progress stops with the CLI
            self.close_warm_workers(wait=False)
            raise
        self.close_warm_workers()
        record, trials_of = {}, {t.label: t for t in trials}
        epochs = {e["label"]: self.train_settings(e)["epochs"] for e in self.cfg["methods"]}
        for label in trials_of:
            mine = [r for r in results if r["label"] == label]
            timed = [(s, _epochs_done(r)) for r in mine if (s := _run_seconds(r)) is not None]
            record[label] = {
                "schedule": self.cfg["lr_search"]["schedule"],
                "rungs": rungs.get(label, []),
                "run_seconds": sum(s for s, _ in timed),
                "epochs_run": sum(e for _, e in timed),
                "grid_epochs": epochs[label] * len(mine),
                "trial_epochs": trials_of[label].train.epochs,  # the span of a trial's lr schedule
                **_grid_estimate(mine, epochs[label]),
            }
        return results, chosen, record

    def halving(self, trials: list[RunSpec]) -> tuple[list[dict], dict, dict]:
        """Successive halving over each method's rates, in synchronous rungs (`halving_rungs`). Every rate
        runs `grace_epochs` epochs on every trial seed; the best 1/reduction_factor by the mean validation
        metric (ties: the lower rate) go on to grace x reduction_factor epochs, and so on while more than one
        rate is left (a rung at the last epoch keeps one). A run pauses at its rung and resumes from its
        checkpoint at the next, so a rerun of an interrupted search skips what is done. The trials'
        learning-rate schedule spans the deciding rung's epochs (`run_spec`), so every rung but the last
        compares rates mid-schedule and the last at the schedule's end.

        Written here rather than taken from Optuna (SuccessiveHalvingPruner) or Ray Tune (ASHA): both judge
        a trial against the trials that reached the rung before it, so with runs in parallel the chosen rate
        would depend on which run finished first, the unreproducible choice this search must not make; Ray
        Tune's synchronous HyperBand would need every run to be a Tune trial, not a peftbench worker.
        """
        rf, grace = self.cfg["lr_search"]["reduction_factor"], self.cfg["lr_search"]["grace_epochs"]
        metric = self.cfg["metric"]
        labels = dict.fromkeys(t.label for t in trials)
        alive = {label: sorted({t.learning_rate for t in trials if t.label == label}) for label in labels}
        epochs = {t.label: t.train.epochs for t in trials}
        stop = {label: min(grace, epochs[label]) for label in alive}
        rungs: dict[str, list[dict]] = {}
        latest: dict[str, dict] = {}
        while open_ := [label for label, lrs in alive.items() if len(lrs) > 1]:
            step = {m: _rung(len(alive[m]), stop[m], epochs[m], rf) for m in open_}  # kept, next epochs
            kept = {m: step[m][0] for m in open_}
            batch = [
                t.with_runtime(
                    stop_after_epoch=stop[t.label] if stop[t.label] < epochs[t.label] else None,
                    deciding_rung=kept[t.label] == 1,  # nothing resumes from this rung's pause
                )
                for t in trials
                if t.label in open_ and t.learning_rate in alive[t.label]
            ]
            rung = 1 + max(len(rungs.get(label, [])) for label in open_)
            latest.update({r["run_id"]: r for r in self.execute(batch, f"lr search, rung {rung}")})
            for label in open_:
                mine = [
                    _at_epoch(latest[t.runtime.run_id], stop[label], t.train, metric)
                    for t in batch
                    if t.label == label
                ]
                means = mean_validation(mine, metric).get(label, {})
                ranked = ranking(metric, means)
                keep = ranked[: kept[label]]
                rungs.setdefault(label, []).append(
                    {
                        "epochs": stop[label],
                        "rates": [{"learning_rate": lr, f"validation_{metric}": means[lr]} for lr in ranked],
                        "kept": keep,
                    }
                )
                alive[label], stop[label] = keep, step[label][1]
        chosen = {label: lrs[0] for label, lrs in alive.items() if len(lrs) == 1}
        for t in trials:  # the search is decided: no paused trial resumes (a rerun finds them done)
            (self.out / "runs" / t.runtime.run_id / "checkpoint.pt").unlink(missing_ok=True)
        return [latest[t.runtime.run_id] for t in trials], chosen, rungs

    @contextlib.contextmanager
    def in_folder(self, force: bool, start_forks: bool):
        """The study's folder locked and claimed (`claim_folder`), with the study's compiler caches; with
        `start_forks`, the forkserver started where it will fork the runs, so that its imports overlap the
        study's preparation. A command that fails stops the forkserver, where no run of it is alive, before
        the lock is let go: its imports make the caches' folders, and the lock removes a folder it made that
        holds nothing else."""
        cfg = self.cfg
        forks = (cfg["executor"], cfg["isolation"], cfg["gpus_per_run"]) == ("local", "process", 1)
        with store.StudyLock(self.out), environ(self.cache_env):
            self.claim_folder(force)
            try:
                if start_forks and forks:
                    start_forkserver()
                yield
            except BaseException:
                stop_idle_forkserver()
                raise

    def claim_folder(self, force: bool) -> None:
        """A study folder belongs to one study: another study's folder, or one holding files peftbench did not
        write, is refused unless `force` moves what is there into an archive- subfolder."""
        owner = store.folder_owner(self.out)
        if owner in (None, store.study_identity(self.cfg)):
            return
        if not force:
            what = (
                "holds another study (other model, data or name)"
                if owner != "other"
                else "holds files that are not a peftbench study's (or a damaged study.json)"
            )
            raise UserError(
                f"output folder {self.out} {what}; choose another --out, or pass --force to move its "
                "contents into an archive- subfolder"
            )
        dest = store.archive(self.out)
        print(f"peftbench: moved the folder's previous contents to {dest}", file=sys.stderr)

    def write_plan(
        self,
        trials: list[RunSpec],
        finals: list[RunSpec],
        chosen: dict,
        complete: bool,
        wall_seconds: float | None = None,
        search: dict | None = None,
    ) -> None:
        plan = {
            "study": self.cfg,
            "identity": store.study_identity(self.cfg),
            "complete": complete,
            "trial_runs": [s.runtime.run_id for s in trials],
            "final_runs": [s.runtime.run_id for s in finals],
            "chosen_learning_rates": chosen,
            "lr_search": search or {},
            "data": {
                "sizes": self.data.sizes(),
                "origin": self.data.source.get("origin"),
                "label_names": self.data.label_names,
                "fingerprint": self.data.fingerprint,
                "overlap": self.data.source.get("overlap"),
                "label_words": self.data.source.get("label_words"),
                "test_labels": self.data.labels["test"].tolist(),
                "truncated": self.truncated_counts(),
                "tokenizer_note": self.tokenizer_note,
            },
            "device": self.device,
            "mps": self.mps,
            "wall_seconds": wall_seconds,
            "prepare_seconds": self.prepare_seconds,
            "prepared_at": self.prepared_at,
            # the lr search from its first trial to its choice, all methods (with `parallel: 1` and one
            # device, the device time it held)
            "lr_search_wall_seconds": self.search_wall_seconds,
        }
        store.atomic_write_json(self.out / "study.json", plan)

    # ---------------------------------------------------------------- the memory plan alone
    def plan(self) -> list[dict]:
        """`peftbench plan`: per method, the probe of its first final run (no training), each in its own
        process like a run; the rows are also written to STUDY/plan.json."""
        with self.in_folder(force=False, start_forks=False):
            t0 = time.perf_counter()
            self.prepare()
            specs = [s for s in self.final_specs({}) if s.seed == self.cfg["seeds"][0]]
            estimated = self.gpu_budget_unapplied()
            lengths = self._cached_tokens().lengths("train") if estimated else None
            rows = [
                self._plan_run(spec, lengths) for spec in specs if registry.get(spec.method).kind != "tfidf"
            ]
            store.atomic_write_json(
                self.out / "plan.json",
                {
                    "rows": rows,
                    "device": self.device,
                    "gpu_memory": self.cfg["gpu_memory"],
                    "estimated": estimated,
                    "wall_seconds": time.perf_counter() - t0,
                },
            )
            return rows

    def _plan_run(self, spec: RunSpec, lengths: np.ndarray | None) -> dict:
        """One method's plan row: its probe in a process like a run's, or, without a GPU, the same search over
        an estimate at the training texts' token counts (`lengths`, given only then)."""
        if spec.train.sharding == "fsdp":  # the probe runs in one process: it cannot see a shard
            return {
                "label": spec.label,
                "method": spec.method,
                "status": "not planned",
                "error": "sharded runs (train.sharding: fsdp) are not probed yet; run the study",
            }
        if lengths is not None:
            return self._estimated_plan(spec, lengths)
        spec = spec.with_runtime(
            run_id=f"plan-{spec.runtime.run_id}", plan_only=True, checkpoint=False, warm=False
        )
        rdir = self._prepare_run_dir(spec)
        if self.cfg["isolation"] == "inline":
            from .worker import execute_run

            execute_run(rdir, progress=False)
        else:
            launch_worker(str(rdir), False, {})
        plan = store.read_json(rdir / "plan.json") or {
            "label": spec.label,
            "status": "failed",
            "error": "the planning process wrote no plan",
        }
        plan["study_seconds"] = self.study_seconds(spec.label, plan.get("run_seconds"))
        return plan

    def _estimated_plan(self, spec: RunSpec, lengths: np.ndarray) -> dict:
        """A plan row from `estimate` (no GPU here): the probe's shape is the longest training sequences,
        padded as a CUDA run pads them."""
        from .batches import pad_multiple, pad_width, steps_per_epoch
        from .estimate import plan_row
        from .memory import parse_size

        cap = spec.effective_max_length or int(lengths.max())
        width = pad_width(min(int(lengths.max()), cap), pad_multiple(spec.train, cuda=True), cap)
        steps = (
            steps_per_epoch(len(lengths), spec.train.batch_size, spec.train.group_by_length)
            * spec.train.epochs
        )
        try:
            return plan_row(spec, width, parse_size(self.cfg["gpu_memory"], "gpu_memory"), steps)
        except Exception as e:  # one method the meta device cannot build or run: the others still plan
            return {
                "run_id": spec.runtime.run_id,
                "label": spec.label,
                "method": spec.method,
                "status": "failed",
                "estimated": True,
                "error": f"could not be estimated without a GPU: {type(e).__name__}: {str(e)[:200]}",
            }

    def study_seconds(self, label: str, run_seconds: float | None) -> float | None:
        """Training time of every run of a method in the study (trials and finals), from one run's
        estimate."""
        if run_seconds is None:
            return None
        n = sum(s.label == label for s in self.trial_specs()) + len(self.cfg["seeds"])
        return run_seconds * n


COMPILER_CACHES = {"TORCHINDUCTOR_CACHE_DIR": "torchinductor", "TRITON_CACHE_DIR": "triton"}


def compiler_caches(out: Path) -> dict[str, str]:
    """Where torch's compiler keeps what it compiles, Inductor's cache and Triton's: in the study's .cache, so
    that a study writes nothing outside its folder (importing torch._dynamo, as transformers' modeling code
    does, makes Inductor's folder in $TMPDIR; `train.compile` fills it, and Triton's in the home folder). A
    cache the user chose (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR), which studies can share, stays theirs.
    Inductor's precompiled C++ headers (`train.compile` on the CPU) stay in $TMPDIR: torch 2.13 places them
    by its default alone."""
    folder = out.resolve() / ".cache"
    return {key: str(folder / name) for key, name in COMPILER_CACHES.items() if key not in os.environ}


@contextlib.contextmanager
def environ(values: dict[str, str]):
    """`values` in os.environ while the block runs, for this process and those it starts; as they were
    after."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def worker_env(progress: bool, extra: dict) -> dict:
    return {
        **os.environ,
        **extra,
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
        "PEFTBENCH_PROGRESS": "1" if progress else "0",
    }


# Fresh processes without the import bill: importing torch + transformers + peft takes seconds per process
# (5.5 s on the 2-core CI machine), paid again by every run. A forkserver that has imported them once forks
# each run's worker: still one process per run (a crash takes down only that run), started in milliseconds.
_FORK: dict = {"ctx": None, "usable": os.environ.get("PEFTBENCH_FORKSERVER", "1") != "0"}
_FORK_LOCK = threading.Lock()
BAD_FORK_EXIT = 75  # the forked worker found CUDA initialised in the server: rerun it as a plain process
# peftbench first: its __init__ quiets bitsandbytes' import-time warning before anything imports it.
# peftbench._peft imports peft without bitsandbytes, which would initialise CUDA (see there).
PRELOAD = [
    "peftbench.worker",
    "torch",
    "transformers",
    "transformers.modeling_utils",
    "peftbench._peft",
    "peftbench.train",
    "peftbench.models",
    "peftbench._forkserver_guard",
]


def bytecode_note(dont_write: bool | None = None, packages=("torch", "transformers")) -> str | None:
    """A note for a machine where every process of a study compiles `packages` from source: Python writes no
    bytecode there (PYTHONDONTWRITEBYTECODE, `dont_write`) and they were installed without any, as uv installs
    by default. On an H100 machine set up so, the starting study's command took 37.1 s, and 26.1-27.3 s with
    bytecode cached (2026-12-07, benchmarks/results/h100-bytecode-54fef75.json)."""
    import importlib.util

    if not (sys.flags.dont_write_bytecode if dont_write is None else dont_write):
        return None
    bare = {}
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec and spec.origin and not os.path.exists(importlib.util.cache_from_source(spec.origin)):
            bare[name] = os.path.dirname(spec.origin)
    if not bare:
        return None
    return (
        f"Python writes no bytecode here (PYTHONDONTWRITEBYTECODE) and {' and '.join(bare)} came without "
        f"any, so each of the study's processes compiles them from source, seconds each; "
        f"`python -m compileall -q -j 0 {' '.join(bare.values())}` compiles them once"
    )


def _fork_context():
    with _FORK_LOCK:
        if _FORK["ctx"] is None:
            import multiprocessing as mp

            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(PRELOAD)
            _FORK["ctx"] = ctx
        return _FORK["ctx"]


def start_forkserver() -> None:
    """Start the forkserver now, so that its imports overlap whatever this process does before the first
    run. It inherits this process's environment: start it within the study's `compiler_caches`, since
    importing torch._dynamo makes Inductor's cache folder."""
    if _FORK["usable"]:
        from multiprocessing import forkserver

        _fork_context()
        forkserver.ensure_running()


def stop_idle_forkserver() -> None:
    """Kill the forkserver this process started, where no run it forked is alive, and wait until it is gone:
    the study is ending on an error. Until its imports are done (seconds) the forkserver holds the command's
    stdout and stderr open, and a pipe (`peftbench run ... | tee log`) would wait for it; and its imports
    make folders in the study's .cache. It is left for multiprocessing to reap, which starts a new one if
    this process runs another study."""
    import multiprocessing
    import signal
    from multiprocessing import forkserver

    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)  # CPython's; None where none was started
    if pid and not multiprocessing.active_children():
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            if hasattr(os, "waitid"):  # Linux; WNOWAIT leaves it to be reaped
                os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)


def _enter_worker(env: dict, cuda: bool, kind: str) -> None:
    """A forked or spawned worker's first step: the run's environment, and out if CUDA cannot be used.
    A forked worker's torch was imported in the server, before this environment: it has not read
    OMP_NUM_THREADS (`Study.thread_env`, or the user's), so the thread count is set here."""
    os.environ.clear()
    os.environ.update(env, PEFTBENCH_WORKER=kind)
    import torch

    if env.get("OMP_NUM_THREADS", "").isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    if cuda and torch.cuda._is_in_bad_fork():
        os._exit(BAD_FORK_EXIT)


def _forked_worker(run_dir: str, env: dict, cuda: bool) -> None:
    with silent_interrupt():
        _enter_worker(env, cuda, "forked")
        sys.argv = ["peftbench.worker", run_dir]
        from .worker import main

        main()


def _warm_worker(conn, env: dict, cuda: bool) -> None:
    with silent_interrupt():  # while it starts or waits between runs too
        import torch

        default_threads = torch.get_num_threads()  # torch's own, before the run's environment sets any
        _enter_worker(env, cuda, "warm")
        from .worker import serve

        serve(conn, default_threads)


class WarmWorker:
    """A worker process for warm trials (`warm_trials`): it runs each run folder it is sent, one after
    another, and lives on between them (from one halving rung to the next) until closed. Forked from the
    preloaded server (spawned where forking is off); started at its first run."""

    def __init__(self, progress: bool, extra_env: dict | None = None):
        self.env = worker_env(progress, extra_env or {})
        self.proc = self.conn = None

    def run(self, rdir: Path, cuda: bool, threads: int | None = None) -> int:
        """One run with `threads` torch threads (None: torch's own count): 0 once its result is written, else
        the exit status of the process, which died in it."""
        if self.proc is not None and not self.proc.is_alive():  # it died between runs: a new one takes over
            self.proc.join()
            self.proc = self.conn = None
        if self.proc is None:
            self._start(cuda)
        self.conn.send((str(rdir), threads))
        while not self.conn.poll(0.2):
            if not self.proc.is_alive():
                break
        try:
            self.conn.recv()
            return 0
        except (EOFError, OSError):  # the process died in this run
            pass
        self.proc.join()
        code, self.proc, self.conn = self.proc.exitcode, None, None
        if code == BAD_FORK_EXIT and _FORK["usable"]:
            _FORK["usable"] = False
            return self.run(rdir, cuda, threads)
        return code

    def _start(self, cuda: bool) -> None:
        import multiprocessing as mp

        ctx = _fork_context() if _FORK["usable"] else mp.get_context("spawn")
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(target=_warm_worker, args=(theirs, self.env, cuda), daemon=False)
        proc.start()  # only a started process is kept: Ctrl-C can land in here; close() joins what is kept
        theirs.close()
        self.proc, self.conn = proc, mine

    def close(self, wait: bool = True) -> None:
        """End the worker: after its run in progress (`wait`), or now, killing that run (it resumes from its
        last checkpoint when the study is rerun)."""
        if self.proc is not None:
            if not wait:
                self.proc.kill()
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.proc.join()
            self.proc = self.conn = None


def launch_worker(run_dir: str, progress: bool, extra_env: dict) -> int:
    """Run the run planned in RUN_DIR/spec.json in a fresh process; its exit status (negative: killed by
    that signal).

    One GPU or CPU: a process forked from the preloaded forkserver (`PEFTBENCH_FORKSERVER=0`: a plain
    `python -m peftbench.worker RUN_DIR`). With the spec's world_size > 1 the worker is started by torchrun
    as that many data-parallel processes (one per GPU).
    """
    spec = json.loads((Path(run_dir) / "spec.json").read_text())
    nproc = spec.get("world_size", 1)
    env = worker_env(progress, extra_env)
    if nproc == 1 and _FORK["usable"]:
        cuda = str(spec.get("device", "")).startswith("cuda")
        proc = _fork_context().Process(target=_forked_worker, args=(run_dir, env, cuda), daemon=False)
        proc.start()
        proc.join()
        if proc.exitcode != BAD_FORK_EXIT:
            return proc.exitcode
        _FORK["usable"] = False
    if nproc == 1:
        cmd = [sys.executable, "-m", "peftbench.worker", run_dir]
        return subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL).returncode
    logs = Path(run_dir) / "torchrun"  # torchrun's folders for its processes' logs, else made in /tmp
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        f"--log-dir={logs}",
        "-m",
        "peftbench.worker",
        run_dir,
    ]
    proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL)
    for folder in sorted(logs.glob("**/"), key=lambda p: -len(p.parts)):  # the deepest first
        if not any(folder.iterdir()):
            folder.rmdir()
    return proc.returncode


RAY_ADDRESS_HINT = (
    "pass --address auto for a cluster started with `ray start` on this machine, or leave --address "
    "out to start a local one"
)


def _check_reachable(address: str | None) -> None:
    """A cluster address (host:port or ray://host:port) that does not answer: a one-line error now, where
    `ray.init` would keep retrying for minutes."""
    if address in (None, "auto", "local"):
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    import socket

    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise UserError(
            f"cannot reach the Ray cluster at {address!r} ({e.strerror or e}); " + RAY_ADDRESS_HINT
        ) from None


def stop_workers() -> None:
    """Kill the run processes this process started (Python would otherwise wait for them as it exits), and
    remove the folder in /tmp that holds its forkserver's socket (the exit that follows, a kill or
    `os._exit`, skips Python's clean-up)."""
    import multiprocessing
    import shutil
    from multiprocessing import util

    for child in multiprocessing.active_children():
        child.kill()
    shutil.rmtree(util.get_temp_dir(), ignore_errors=True)


class RunSlot:
    """A Ray actor holding one run's GPUs or CPUs for the study (see `Study._execute_ray`)."""

    def close(self) -> None:
        """Before Ray kills the actor: its forkserver's folder in /tmp would be left behind."""
        stop_workers()

    def run(self, run_dir: str, env: dict) -> tuple[int, dict | None]:
        """The same worker process as the local executor; its exit status and result."""
        from . import faults

        faults.in_ray_task(run_dir, env.get("PEFTBENCH_INJECT_FAULT"))
        with environ({key: env[key] for key in COMPILER_CACHES if key in env}):  # for its forkserver too
            code = launch_worker(run_dir, False, env)
        return code, store.read_result(Path(run_dir) / "result.json")


def collect(spec: RunSpec, rdir: Path, returncode: int, launched_at: float = 0.0) -> dict:
    """The run's result; if the worker died without writing one (segfault, kill, host OOM), record that."""
    result = store.read_result(rdir / "result.json")
    fresh = (
        result is not None
        and result.get("config_hash") == spec.config_hash
        and (result.get("started_at") or 0) >= launched_at
        and (result.get("finished_at") or 0) >= result["started_at"]
    )
    if fresh and (returncode == 0 or result["status"] != "success"):
        return (
            result  # the worker's own account (a failing data-parallel run exits non-zero after writing it)
        )
    if fresh and result.get("artefact"):
        # A run that finished, saved its artefact and wrote its result, then exited non-zero while the
        # process shut down: what it measured stands, and the exit status is kept beside it.
        result["worker_exit_status"] = returncode
        store.atomic_write_json(rdir / "result.json", result)
        return result
    crash = (
        [ln for ln in (rdir / "crash.log").read_text(errors="replace").splitlines() if ln.strip()][:1]
        if (rdir / "crash.log").exists()
        else []
    )
    sig = -returncode if returncode < 0 else None
    if sig:
        import signal

        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else "?"
        why = f"killed by {name} (signal {sig})" + (" - out of host memory?" if sig == 9 else "")
    else:
        why = f"exited with status {returncode}"
    return record_failure(
        spec, rdir, f"worker {why} without writing a result" + (f": {crash[0]}" if crash else "")
    )


def record_failure(spec: RunSpec, rdir: Path, error: str) -> dict:
    """Write (and return) a `failed` result for a run whose worker could not write its own."""
    from .worker import base_result

    result = {**base_result(spec), "status": "failed", "error": error}
    store.atomic_write_json(rdir / "result.json", result)
    return result


def mean_validation(trials: list[dict], metric: str = "accuracy") -> dict[str, dict[float, float]]:
    """Per method label and trial learning rate, the mean validation `metric` over its trial seeds; a rate
    with a failed seed is left out."""
    accs: dict[str, dict[float, list]] = {}
    for r in trials:
        ok = r.get("status") in store.VALIDATED
        accs.setdefault(r["label"], {}).setdefault(r["learning_rate"], []).append(
            r["metrics"][f"validation_{metric}"] if ok else None
        )
    # rounded: two seeds' means that tie in items must tie in floats too (the tie rule: the lower rate)
    return {
        label: {lr: round(float(np.mean(a)), 12) for lr, a in by_lr.items() if None not in a}
        for label, by_lr in accs.items()
    }


def select_learning_rates(trials: list[dict], metric: str = "accuracy") -> dict[str, float]:
    """Per method label, the trial learning rate with the best mean validation `metric` over its trial seeds
    (a rate with a failed seed is not chosen; ties: the lower rate)."""
    return {
        label: ranking(metric, scored)[0]
        for label, scored in mean_validation(trials, metric).items()
        if scored
    }


def halving_rungs(search: dict, epochs: int) -> list[tuple[int, int]]:
    """The rungs of a halving search over `search["points"]` rates with none failing: each rung's epochs and
    how many rates it keeps, as `Study.halving` runs them; the last rung, which keeps one, decides.

    A trial's learning-rate schedule (warm-up, then decay to zero) spans the last rung's epochs rather than
    the finals' `epochs`. Compared part-way through a longer schedule, while the rate is still near its peak,
    a smaller rate tends to lead (the short-horizon bias: Wu et al. 2018, "Understanding Short-Horizon Bias
    in Stochastic Meta-Optimization"); a schedule that decays to zero within the budget is what gets the most
    out of a short run (Li et al. 2020, "Budgeted Training"). On all-MiniLM-L6-v2 and IMDb
    (results/README.md) IA3's 3e-3 led 7.1e-3 at 1 and 2 of 5 epochs and ended 1.8 points behind at 5; over
    a 2-epoch schedule 7.1e-3 led at 2."""
    rates, stop, rungs = search["points"], min(search["grace_epochs"], epochs), []
    while rates > 1:
        rates, after = _rung(rates, stop, epochs, search["reduction_factor"])
        rungs.append((stop, rates))
        stop = after
    return rungs


def _rung(rates: int, stop: int, epochs: int, rf: int) -> tuple[int, int]:
    """A halving rung over `rates` rates at `stop` of `epochs` epochs: how many rates it keeps (one at the
    last epoch, where the search is decided too; else 1/rf of them) and the next rung's epochs."""
    return (1 if stop >= epochs else max(1, rates // rf)), min(stop * rf, epochs)


def _at_epoch(r: dict, epochs: int, train: TrainSettings, metric: str) -> dict:
    """A trial's result as it stood after `epochs` epochs: a rerun of an interrupted search finds trials
    that went on to a later rung, and a rung compares its rates at its own epochs."""
    if r.get("status") not in store.VALIDATED:
        return r
    if sum(h["epoch"] <= epochs for h in r["history"]) < epochs:
        return {**r, "status": "failed"}
    _, value = validation_at(r["history"], epochs, train.select_best_epoch, metric)
    return {**r, "metrics": {**r["metrics"], f"validation_{metric}": value}}


def _already_done(old: dict | None, spec: RunSpec) -> bool:
    """A result that stands for `spec`: successful under the same hash, or paused at or past its rung."""
    if not old or old.get("config_hash") != spec.config_hash:
        return False
    stop = spec.runtime.stop_after_epoch
    return old.get("status") == "success" or (
        bool(stop) and old.get("status") == "paused" and old["metrics"].get("epochs_done", 0) >= stop
    )


def _run_seconds(r: dict) -> float | None:
    m = r.get("metrics") or {}
    if m.get("train_seconds") is None:
        return None
    return m["train_seconds"] + (m.get("validation_seconds") or 0.0)


def _grid_estimate(results: list[dict], epochs: int) -> dict:
    """What the full grid would have spent training and validating these trials, each for `epochs` epochs,
    and the seconds spent starting CUDA graphs. A trial that stopped early is extended by its epochs' time
    without the graph start-up, which a process pays once (with `warm_trials`, only its first trial; with
    a process per trial, a halving trial resumed at a later rung pays it again, where the grid's trial
    would not have): scaling its seconds by epochs would overstate the grid's cost.
    Validation's first pass in a process is slower too, by an amount the trial cannot tell apart, so the
    estimate is a range: validation extended at the trial's own seconds per epoch (high), or not extended
    (low). A trial that failed or diverged counts as it ran. Empty where a trial's history lacks the
    start-up time (results written before it was recorded)."""
    low = high = start = 0.0
    for r in results:
        m, history = r.get("metrics") or {}, r.get("history") or []
        if r["status"] not in store.VALIDATED:  # it would have ended as early in the grid
            ran = _run_seconds(r) or 0.0
            low, high = low + ran, high + ran
            continue
        timed = m.get("train_seconds") is not None and all("graph_start_seconds" in h for h in history)
        if not (history and timed):
            return {}
        spent = sum(h["graph_start_seconds"] for h in history)
        val, share = m.get("validation_seconds") or 0.0, epochs / len(history)
        trained = history[0]["graph_start_seconds"] + (m["train_seconds"] - spent) * share
        low, high, start = low + trained + val, high + trained + val * share, start + spent
    return {"grid_run_seconds": high, "grid_run_seconds_low": low, "graph_start_seconds": start}


def _epochs_done(r: dict) -> int:
    m = r.get("metrics") or {}
    return m.get("epochs_done") or (r.get("config") or {}).get("train", {}).get("epochs", 0)


def _one_line(r: dict) -> str:
    m = r.get("metrics") or {}
    metric = (r.get("config") or {}).get("metric", "accuracy")
    if r["status"] == "paused":
        return (
            f"  {r['run_id']}: val {metric} {m[f'validation_{metric}']:.4f} after {m['epochs_done']} epoch(s)"
        )
    if r["status"] != "success":
        return f"  {r['run_id']}: {r['status']} - {r.get('error')}"
    split = "test" if f"test_{metric}" in m else "validation"
    return f"  {r['run_id']}: {split} {metric} {m[f'{split}_{metric}']:.4f}, train {m['train_seconds']:.1f}s"
