"""Runner set-up shared by pipeline.build and pipeline.audit: DirectRunner by default, and Beam's
DaskRunner on a dask.distributed cluster (`--runner=DaskRunner`).

  --runner=DaskRunner --dask_client_address=tcp://HOST:8786   a running scheduler (`dask scheduler`)
  --runner=DaskRunner [--dask_local_workers=N]                 a LocalCluster of N worker processes
                                                               (0 = one per core), closed at the end

Before the job: an unreachable scheduler, a scheduler without workers, or input/output paths that a
worker cannot see are refused with one line (RunnerError). After it, the runner's client is closed
(Beam 2.77's DaskRunner leaves it open) and so is any LocalCluster started here.
"""
from __future__ import annotations

import contextlib
import functools
import logging as std_logging
import os
import shlex
import sys

from absl import logging
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

DASK_RUNNER = "apache_beam.runners.dask.dask_runner.DaskRunner"
CONNECT_TIMEOUT_S = 10
WORKER_WAIT_S = 60


class RunnerError(ValueError):
    """A runner set-up that cannot work; the message names the problem."""


_LOCAL_OPTIONS = []


def _local_dask_options():
    """Registered on first use only: a PipelineOptions subclass is parsed into every runner's options,
    and other runners' workers would warn about the unknown flag."""
    if not _LOCAL_OPTIONS:
        class LocalDaskOptions(PipelineOptions):
            @classmethod
            def _add_argparse_args(cls, parser):
                parser.add_argument("--dask_local_workers", type=int, default=0,
                                    help="DaskRunner without --dask_client_address: worker processes of the "
                                         "LocalCluster started for the job (one thread each); 0 = one per core")
        _LOCAL_OPTIONS.append(LocalDaskOptions)
    return _LOCAL_OPTIONS[0]


def set_default_runner(options: PipelineOptions) -> str:
    """DirectRunner unless --runner names one (Beam 2.77 would try Prism first); 'DaskRunner' is
    accepted as the short name Beam lacks for it. Returns the runner's name."""
    std = options.view_as(StandardOptions)
    if not std.runner:
        std.runner = "DirectRunner"
    elif str(std.runner) in ("DaskRunner", "dask"):
        std.runner = DASK_RUNNER
    return str(std.runner)


def pipeline_runner(options: PipelineOptions):
    """The runner object for beam.Pipeline(runner=...), or None to let Beam resolve --runner.

    DirectRunner: the FnApiRunner that Beam 2.77's DirectRunner falls back to, built as it builds it.
    Named DirectRunner, Beam 2.77 still tries Prism first: offline it starts a job server and logs a
    refused download; online it downloads a Go binary and runs the job on an engine the build was not
    measured on. --runner=PrismRunner asks for Prism explicitly."""
    name = str(options.view_as(StandardOptions).runner).rsplit(".", 1)[-1].lower()
    if name.removesuffix("runner") not in ("direct", "switchingdirect"):  # Beam's spellings: direct, DirectRunner
        return None
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    return _fn_api_runner_class()(provision_info=fn_runner.ExtendedProvisionInfo(
        beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)))


@functools.cache
def _fn_api_runner_class():
    from apache_beam.portability import python_urns
    from apache_beam.runners.portability.fn_api_runner import fn_runner

    class FnApiRunner(fn_runner.FnApiRunner):
        """Beam's, except that in multi_processing mode each worker process ends itself when the driver
        is gone, SIGKILL included (pipeline.runtime.sdk_worker): with Beam's own command, workers
        outlived a killed driver by up to 2 minutes. Same environment, only its command line differs."""

        def run_via_runner_api(self, pipeline_proto, options):
            beams = f"{sys.executable} -m apache_beam.runners.worker.sdk_worker_main".encode()
            ours = f"exec {shlex.quote(sys.executable)} -m pipeline.runtime.sdk_worker {os.getpid()}".encode()
            for env in pipeline_proto.components.environments.values():
                if env.urn == python_urns.SUBPROCESS_SDK and env.payload == beams and os.name == "posix":
                    env.payload = ours  # `sh -c`: exec makes the driver the worker's parent
            return super().run_via_runner_api(pipeline_proto, options)
    return FnApiRunner


def is_dask(options: PipelineOptions) -> bool:
    return str(options.view_as(StandardOptions).runner).rsplit(".", 1)[-1] == "DaskRunner"


def _dask_options(options):
    try:
        from apache_beam.runners.dask.dask_runner import DaskOptions
        import distributed  # noqa: F401
    except ImportError as e:
        raise RunnerError(f"DaskRunner needs apache-beam[dask] (dask, distributed): {e}") from e
    return options.view_as(DaskOptions)


def _sees_paths(paths):  # runs on each worker
    return [p for p in paths if not os.path.exists(p)]


@contextlib.contextmanager
def session(options: PipelineOptions, *, worker_paths=(), partitions=0):
    """Around building and running a pipeline. For DaskRunner: starts a LocalCluster when no scheduler
    is named, refuses an unreachable or worker-less scheduler and local paths a worker cannot see
    (worker_paths), and sets --dask_npartitions to `partitions` (an int, or a function of the cluster's
    thread count) unless given: the runner's default of 128 elements per partition would put a whole
    small listing in one task. Other runners: nothing."""
    set_default_runner(options)
    if not is_dask(options):
        yield
        return
    dopts = _dask_options(options)
    import dask
    from distributed import Client, LocalCluster

    std_logging.getLogger("distributed").setLevel(std_logging.WARNING)  # INFO: a line per connection

    cluster = None
    if not dopts.address and not dopts.scheduler_file:
        n = options.view_as(_local_dask_options()).dask_local_workers or os.cpu_count() or 1
        # Processes, not threads: the DoFns are CPU-bound Python; 127.0.0.1 only, no dashboard.
        # (the scheduler's HTTP server would still take 8787 or warn: a free port on 127.0.0.1 instead)
        # Forked on Linux: workers start with Beam and OpenCV already imported, in 1 s instead of the ~10 s
        # that spawned workers spent re-importing them (2 loaded cores), and exit at once (spawned: ~3 s).
        # Elsewhere (macOS: fork is unsafe there) dask's default, spawn.
        method = "fork" if sys.platform.startswith("linux") else "spawn"
        with dask.config.set({"distributed.worker.multiprocessing-method": method}):
            cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                                   dashboard_address=None,
                                   scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})
        dopts.address = cluster.scheduler_address
        logging.info("DaskRunner: started a LocalCluster of %d worker processes at %s", n, dopts.address)
    try:
        # A LocalCluster started here is up, on this machine's filesystem: nothing to check.
        threads = n if cluster is not None else _check_cluster(Client, dopts, worker_paths)
        if callable(partitions):
            partitions = partitions(threads)
        if partitions and not dopts.npartitions and not dopts.partition_size:
            dopts.npartitions = partitions
        yield
    finally:
        if cluster is not None:
            try:  # worker processes that imported Beam take seconds to exit; the nanny kills them after 4 s
                cluster.close()
            except Exception as e:  # the job's outcome is decided; a slow shutdown must not change it
                logging.warning("DaskRunner: closing the LocalCluster: %s: %s", type(e).__name__, e)


def _check_cluster(Client, dopts, worker_paths) -> int:
    """Refuses a scheduler that does not answer, has no workers, or whose workers miss a local path;
    returns the cluster's thread count."""
    where = dopts.address or f"scheduler file {dopts.scheduler_file}"
    try:
        client = Client(address=dopts.address, scheduler_file=dopts.scheduler_file,
                        timeout=dopts.timeout if isinstance(dopts.timeout, int) else CONNECT_TIMEOUT_S,
                        set_as_default=False)
    except (OSError, TimeoutError, ValueError) as e:
        raise RunnerError(f"cannot reach the dask scheduler at {where}: {type(e).__name__}: {e}") from e
    try:
        try:
            client.wait_for_workers(1, timeout=WORKER_WAIT_S)
        except TimeoutError as e:
            raise RunnerError(f"the dask scheduler at {where} has no workers after {WORKER_WAIT_S} s "
                              f"(start some with `dask worker {dopts.address or 'ADDRESS'}`)") from e
        local = [p for p in worker_paths if p and "://" not in p]
        if local:
            missing = {w: m for w, m in client.run(_sees_paths, local).items() if m}
            if missing:
                w, m = sorted(missing.items())[0]
                raise RunnerError(f"dask worker {w} cannot see {', '.join(m)}: data and output must be on a "
                                  f"filesystem every worker mounts at the same path")
        workers = client.scheduler_info()["workers"]
        threads = sum(w.get("nthreads", 1) for w in workers.values())
        logging.info("DaskRunner: %d workers, %d threads at %s", len(workers), threads, where)
        return threads
    finally:
        client.close()


def wait(result) -> None:
    """result.wait_until_finish(), then close(result). A task whose dask workers kept dying
    (distributed.scheduler.allowed-failures, 3 by default) fails the job: one line (RunnerError)."""
    try:
        result.wait_until_finish()
    except Exception as e:
        if type(e).__name__ == "KilledWorker":  # distributed.KilledWorker, without importing dask here
            raise RunnerError(f"the dask job failed, workers died running one of its tasks: "
                              f"{str(e).splitlines()[0][:300]}") from e
        raise
    finally:
        close(result)


def close(result) -> None:
    """Closes the client a DaskRunner job opened (a no-op for other runners' results)."""
    client = getattr(result, "client", None)
    if client is not None and hasattr(client, "close"):
        client.close()


def counters(result, namespace: str):
    """{name: committed} of the job's Beam counters in namespace, or None where the runner keeps none
    (Beam 2.77's DaskRunnerResult.metrics() raises NotImplementedError)."""
    from apache_beam.metrics.metric import MetricsFilter
    try:
        found = result.metrics().query(MetricsFilter().with_namespace(namespace))["counters"]
    except NotImplementedError:
        logging.warning("%s collects no Beam metrics; the counts are in the job's own output",
                        type(result).__name__)
        return None
    except Exception as e:  # metrics are a convenience; never fail a finished job over them
        logging.warning("could not read Beam metrics: %s", e)
        return None
    return {c.key.metric.name: c.committed for c in sorted(found, key=lambda c: c.key.metric.name)}
