"""Where the engine's work items run: in this process (:class:`LocalExecutor`) or on a Ray cluster
(:class:`RayExecutor`).

Every sweep of the engine (ablation chunks, COAR's and the held-out sets' masks, the mask-averaged gradient's masks,
causal tracing's restorations) is a :class:`Job` plus a list of spans ``[start, stop)`` of its items. A job is
data, not a closure: the dotted names of two module-level functions and their arguments (component addresses,
masks, clean states: tensors and plain values)::

    state = setup(obj, **job.args)        # once per worker and job: parse components, compile the plan; no passes
    out = run(state, start, stop)         # one chunk: a dict of tensors

so it can be shipped to another process. A Ray worker is an actor that loads the model once (by the
:attr:`DiffusionModel.source` it was loaded from, checked against the driver's weight fingerprint) and builds each
objective once (the evaluation set is a pure function of the objective's config and the model); it keeps the
states of its recent jobs. The driver writes every finished chunk into the result store as it arrives (so a
killed driver resumes from the store, with either executor) and adds the passes the worker counted to the model's
counters (so the cost a run records does not depend on where it ran). Ray restarts a killed actor and retries its
items (``max_restarts``, ``max_task_retries``): a killed worker costs only its items. Ray Core's actor pattern:
https://docs.ray.io/en/latest/ray-core/actors.html
"""

from __future__ import annotations

import importlib
import os
import socket
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from interp.core.features import attach, attached, detach
from interp.core.models import load_model, model_fingerprint
from interp.core.objectives import Objective
from interp.core.store import config_hash, tensor_digest

Span = tuple[int, int]


@dataclass(frozen=True)
class Job:
    """A sweep's work as data: ``run(setup(obj, **args), start, stop)`` for each span of items."""

    setup: str  # "module:function"
    run: str  # "module:function"
    args: dict = field(default_factory=dict)


def _resolve(name: str):
    module, _, fn = name.partition(":")
    return getattr(importlib.import_module(module), fn)


def _counted(counters: Counter, fn, *args) -> tuple[object, dict[str, int]]:
    """``fn(*args)`` and how much ``counters`` grew while it ran."""
    before = Counter(counters)
    out = fn(*args)
    return out, {k: int(v - before.get(k, 0)) for k, v in counters.items() if v != before.get(k, 0)}


class LocalExecutor:
    """Runs every item in this process, in order, on the driver's own objective and model."""

    name = "local"

    def map(self, obj, job: Job, spans: Iterable[Span]) -> Iterator[tuple[Span, dict, dict]]:
        """Yield ``(span, result, counters)`` for each span (counters: the model passes it took, already counted in
        ``obj.model.counters``)."""
        spans = list(spans)
        if not spans:
            return
        state = _resolve(job.setup)(obj, **job.args)
        run = _resolve(job.run)
        for span in spans:
            out, used = _counted(obj.model.counters, run, state, *span)
            yield span, out, used

    def close(self) -> None:
        """Nothing to release: the local executor runs in this process."""
        pass


LOCAL = LocalExecutor()


@dataclass(frozen=True)
class ObjectiveRecipe:
    """What a worker needs to rebuild the driver's objective: where the model comes from and J's config."""

    source: str
    name: str
    device: str
    dtype: str
    fingerprint: str
    concept: object  # interp.core.concepts.Concept (a frozen dataclass)
    config: object  # interp.core.objectives.ObjectiveConfig
    #: The sparse autoencoders attached to the driver's model (interp.core.features.FeatureDictionary): a worker
    #: attaches the same ones, so feature components parse and act there as in the driver.
    features: tuple = ()
    #: ``((site, digest), ...)`` of ``features``, hashed once in the driver: a job's identity, and what a worker
    #: compares to know whether it holds these dictionaries already.
    feature_digests: tuple = ()

    @classmethod
    def of(cls, obj) -> "ObjectiveRecipe":
        """The recipe that rebuilds objective ``obj`` in a worker: the model's source, precision and weight
        fingerprint, the concept and the objective's config.

        Raises:
            ValueError: the model was built in memory (no folder or name a worker could load it from).
        """

        m = obj.model
        if m.source is None:
            raise ValueError("the Ray executor needs a model loaded by interp.load_model from a name or a folder (its "
                             "workers load it again); save_pretrained this pipeline to a folder and load that, or use "
                             "the local executor")
        saes = tuple(attached(m).values())
        return cls(source=m.source, name=m.name, device=str(m.device), dtype=str(m.dtype).replace("torch.", ""),
                   fingerprint=model_fingerprint(m), concept=obj.concept, config=obj.config, features=saes,
                   feature_digests=tuple((sae.site, sae.digest()) for sae in saes))

    @property
    def model_key(self) -> tuple:
        """What identifies the model a worker must hold: source, name, device, precision and fingerprint."""
        return self.source, self.name, self.device, self.dtype, self.fingerprint


class _Worker:
    """A Ray actor's state: one model, its objectives, the states of its recent jobs."""

    JOBS_KEPT = 4  # states (compiled plans, clean values) of this many recent jobs stay in memory

    def __init__(self, model_key: tuple, threads: int | None):
        source, name, device, dtype, fingerprint = model_key
        if threads:
            torch.set_num_threads(threads)
        self.model = load_model(source, device=device, dtype=dtype)
        self.model.name = name  # the driver's name for it: part of the fingerprint and of every result
        got = model_fingerprint(self.model)
        if got != fingerprint:
            raise RuntimeError(f"the worker loaded {source!r} with weight fingerprint {got}, but the driver's model "
                               f"has {fingerprint}: the driver's model was changed after loading, or the folder "
                               f"differs on this node; run on unchanged weights from a folder every node can read")
        self.objectives: dict = {}
        self.states: OrderedDict = OrderedDict()
        self.feature_digests: tuple = ()  # the recipe's dictionaries this worker's model holds

    def pid(self) -> int:
        return os.getpid()

    def attach_features(self, recipe: ObjectiveRecipe) -> None:
        """Hold exactly the driver's dictionaries (compared by their digests; a change detaches the old ones)."""
        if recipe.feature_digests == self.feature_digests:
            return
        for site in attached(self.model):
            detach(self.model, site)
        for sae in recipe.features:
            attach(self.model, sae)
        self.feature_digests = recipe.feature_digests

    def run(self, recipe: ObjectiveRecipe, job_key: str, job: Job, start: int, stop: int):
        self.attach_features(recipe)
        okey = (recipe.concept, recipe.config)
        if okey not in self.objectives:
            self.objectives[okey] = Objective(self.model, recipe.concept, recipe.config).warm()
        obj = self.objectives[okey]
        if job_key not in self.states:
            self.states[job_key] = _resolve(job.setup)(obj, **job.args)
            while len(self.states) > self.JOBS_KEPT:
                self.states.popitem(last=False)
        self.states.move_to_end(job_key)
        return _counted(self.model.counters, _resolve(job.run), self.states[job_key], start, stop)


class RayExecutor:
    """Runs a sweep's items as Ray tasks on actors that each load the model once.

    ``address``: an existing cluster (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``); None starts a local
    one with ``workers * cpus_per_worker`` CPUs (default: the machine's), or uses the one this process already
    started. ``workers``: actors
    (default: the cluster's CPUs / ``cpus_per_worker``, or its GPUs / ``gpus_per_worker``). ``cpus_per_worker``
    sets each worker's torch threads; ``gpus_per_worker`` > 0 puts a worker on each GPU share (then load the model
    with ``device="cuda"`` so workers use it). ``max_retries``: restarts of a killed actor and retries of its items.
    ``placement_timeout``: seconds to wait for a local cluster to free the workers' CPUs/GPUs (workers of a previous
    model release theirs asynchronously) before failing. ``connect_timeout``: seconds to wait for a cluster at
    ``address`` to accept a connection, checked when the executor is made (Ray itself retries for minutes).

    Raises:
        ValueError: a bad worker count or share.
        ConnectionError: nothing answers at ``address`` within ``connect_timeout``.
        ImportError: Ray is not installed.
    """

    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None, cpus_per_worker: int = 1,
                 gpus_per_worker: float = 0, max_retries: int = 3, in_flight: int = 2,
                 placement_timeout: float = 30.0, connect_timeout: float = 10.0):
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if cpus_per_worker < 1 or gpus_per_worker < 0:
            raise ValueError(f"cpus_per_worker must be >= 1 and gpus_per_worker >= 0, got {cpus_per_worker}, "
                             f"{gpus_per_worker}")
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ImportError("the Ray executor needs Ray: pip install -e '.[ray]' (or pip install 'ray[default]')") \
                from None
        if address is not None and address != "auto":
            _check_reachable(address, connect_timeout)
        self.address, self.workers = address, workers
        self.cpus, self.gpus, self.max_retries, self.in_flight = cpus_per_worker, gpus_per_worker, max_retries, in_flight
        self.placement_timeout = placement_timeout
        self._actors: list = []
        self._model_key: tuple | None = None
        self._started = False

    # -- cluster and actors --------------------------------------------------------------------------------------
    def _connect(self):
        import ray

        if not ray.is_initialized():
            # a local cluster: as many CPUs as the workers need (default: Ray counts the machine's)
            kw = {"address": self.address} if self.address else \
                {"num_cpus": self.workers * self.cpus if self.workers else None}
            ray.init(**kw, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
                     runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
            self._started = True
        return ray

    def actors(self, recipe: ObjectiveRecipe) -> list:
        """The workers for ``recipe``'s model, started (and the model loaded in each) on first use."""
        ray = self._connect()
        if self._actors and self._model_key == recipe.model_key:
            return self._actors
        self._kill_actors()
        n = self.workers
        if n is None:
            res = ray.cluster_resources()
            n = int(res.get("GPU", 0) // self.gpus) if self.gpus else int(res.get("CPU", 1) // self.cpus)
            n = max(n, 1)
        if self.address is None:  # a local cluster does not grow: workers that cannot be placed would wait forever
            self._wait_for_resources(ray, {"CPU": n * self.cpus, "GPU": n * self.gpus}, n, self.placement_timeout)
        remote = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_restarts=self.max_retries,
                            max_task_retries=self.max_retries)(_Worker)
        self._actors = [remote.remote(recipe.model_key, self.cpus) for _ in range(n)]
        # Wait until every worker is placed and has loaded the model: until then its CPUs still count as free, and a
        # second executor's placement check (above) would pass and leave its workers waiting forever.
        ray.get([a.pid.remote() for a in self._actors])
        self._model_key = recipe.model_key
        return self._actors

    @staticmethod
    def _wait_for_resources(ray, need: dict, n: int, timeout: float = 30.0) -> None:
        """Wait until the local cluster has ``need`` free (killed workers release theirs asynchronously), or raise."""
        deadline = time.monotonic() + timeout
        while True:
            free = ray.available_resources()
            short = [(k, v) for k, v in need.items() if v and free.get(k, 0) < v]
            if not short:
                return
            if time.monotonic() > deadline:
                name, v = short[0]
                raise RuntimeError(
                    f"the local Ray cluster has {free.get(name, 0):g} {name}s free but {n} workers need {v:g}: "
                    f"close the other RayExecutor of this process, or ask for fewer workers")
            time.sleep(0.2)

    def worker_pids(self) -> list[int]:
        """The process ids of the Ray worker actors (the tests kill one to check recovery)."""
        import ray

        return ray.get([a.pid.remote() for a in self._actors])

    # -- the sweep -----------------------------------------------------------------------------------------------
    def map(self, obj, job: Job, spans: Iterable[Span]) -> Iterator[tuple[Span, dict, dict]]:
        """Yield ``(span, result, counters)`` as items finish (in any order); the worker's counted passes are added
        to ``obj.model.counters``."""

        spans = list(spans)
        if not spans:
            return
        recipe = ObjectiveRecipe.of(obj)
        actors = self.actors(recipe)
        ray = self._connect()
        recipe_ref, job_ref = ray.put(recipe), ray.put(job)
        job_key = config_hash({"setup": job.setup, "run": job.run, "concept": repr(recipe.concept),
                               "objective": repr(recipe.config), "args": tensor_digest(job.args),
                               "features": dict(recipe.feature_digests)})
        todo = list(reversed(spans))
        pending: dict = {}

        def submit(i):
            span = todo.pop()
            pending[actors[i].run.remote(recipe_ref, job_key, job_ref, *span)] = (span, i)

        for _ in range(self.in_flight):
            for i in range(len(actors)):
                if todo:
                    submit(i)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            span, i = pending.pop(done[0])
            out, used = ray.get(done[0])
            obj.model.counters.update(used)
            if todo:
                submit(i)
            yield span, out, used

    def _kill_actors(self):
        if self._actors:
            import ray

            for a in self._actors:
                ray.kill(a)
            self._actors = []

    def close(self) -> None:
        """Stop the workers, and the local cluster if this executor started it."""
        self._kill_actors()
        if self._started:
            import ray

            ray.shutdown()
            self._started = False


def _check_reachable(address: str, timeout: float) -> None:
    """A one-line ConnectionError when nothing accepts a TCP connection at a Ray address (``host:port`` or
    ``ray://host:port``) within ``timeout`` seconds."""

    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"Ray address {address!r} is not 'auto', 'host:port' or 'ray://host:port'")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        raise ConnectionError(f"no Ray cluster answers at {address} ({err.strerror or type(err).__name__}; waited at "
                              f"most {timeout:g} s): start one there with `ray start --head`, or leave out --ray-address "
                              f"to start a local one") from None


def make_executor(name: str = "local", **options):
    """``"local"`` or ``"ray"`` (options: :class:`RayExecutor`'s)."""
    if name == "local":
        if any(v is not None for v in options.values()):
            raise ValueError(f"options {sorted(k for k, v in options.items() if v is not None)} are for the Ray "
                             f"executor: pass executor='ray'")
        return LOCAL
    if name == "ray":
        return RayExecutor(**{k: v for k, v in options.items() if v is not None})
    raise ValueError(f"unknown executor {name!r}: use 'local' or 'ray'")
