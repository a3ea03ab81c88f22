"""A DirectRunner worker process (--direct_running_mode=multi_processing): Beam's own sdk_worker_main,
plus a watchdog that ends the worker as soon as the driver that started it is gone.

Without it, a worker whose driver was SIGKILLed while the worker was starting waited 60 s for the
logging channel and 60 s more for the control channel before giving up (~2 min of an orphan).
pipeline.runtime.runners starts it as `exec python -m pipeline.runtime.sdk_worker DRIVER_PID`: the
exec makes the driver the worker's parent, so a parent PID that changes (the kernel reparents the
orphan) means the driver is gone. A local subprocess of the driver only; remote runners never run this.
pipeline.local_build's and model.evaluate's worker pools start the same watchdog (exit_without_driver).
"""
import os
import sys
import threading
import time

POLL_S = 0.2


def exit_without_driver(driver_pid: int) -> None:
    def watch():
        while os.getppid() == driver_pid:
            time.sleep(POLL_S)
        print(f"pipeline.runtime.sdk_worker: driver {driver_pid} is gone; worker {os.getpid()} exits",
              file=sys.stderr, flush=True)
        os._exit(1)  # at once: no bundle in flight may write on, no wait for channels that will never answer

    threading.Thread(target=watch, name="exit_without_driver", daemon=True).start()


if __name__ == "__main__":
    exit_without_driver(int(sys.argv.pop(1)))
    from apache_beam.runners.worker import sdk_worker_main

    sdk_worker_main.main(sys.argv)
