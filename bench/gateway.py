"""Benchmark: the device gateway (mutual TLS) with 10,000 simulated devices registered.

Per database (SQLite, PostgreSQL), on loopback, in one run:

0. **Fleet** — a cached bench fleet (``bench/_servers.py``: real ceremony, factory, batch) with
   ``--devices`` virtual devices enrolled through the real bulk issuance path (operator API,
   ``POST /v1/batches/{id}/devices/bulk``, real P-256 keys and CSRs; the simulator's
   ``enroll_devices``). Devices and database are kept between runs (``--fresh`` rebuilds).
1. **(a) Full mTLS handshakes/s** — the SAME client for both servers: ``--clients`` parallel
   ``openssl s_time -new`` processes (each with its own device certificate and key; TLS 1.3;
   every connection a full handshake with client-certificate verification) for
   ``--tls-seconds``, requesting ``GET /healthz`` (HTTP/1.0: one request per connection) from
   the gateway and from ``openssl s_server -HTTP -Verify 5 -no_ticket`` (same 15-byte answer,
   from a file) started with the gateway's own certificate, key and client-CA bundle.
   Ratio = gateway / s_server, for a gateway with ONE worker process (per core, like the
   single-process s_server) and with ``--workers``. Connections are counted by s_time, time
   by our wall clock.
2. **(b) Resumed handshakes/s** — the same clients with ``s_time -reuse`` (session resumption;
   the share actually resumed is counted from s_time's ``r`` marks), plus the simulator's
   ``resume`` mode (a new connection per real check-in, offering the previous session).
   The simulator's ``handshake`` mode (a new full handshake per real check-in) is reported too.
3. **(c) Kept-alive check-ins/s** — the simulator (``keepalive``, lean client, warm-up first so
   every connection is open before the clock starts) with ``--active`` devices and
   ``--concurrency`` in-flight check-ins over ``--sim-processes`` processes, against the
   gateway with ``--workers`` processes: rate, p50/p99 latency, errors, and the CPU time per
   check-in of the gateway workers and of the simulator (from /proc and the simulator).

Everything runs on the same 2-core machine: load generator and servers share the CPUs, so the
CPU cost per check-in is printed alongside the rates, and the load average before/after (other
processes on the machine skew every figure). ``--profile`` samples one gateway worker with
py-spy during (c) and prints the hottest frames.

    .venv/bin/python bench/gateway.py --db both            # < 10 min (first run: + enrollment)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _servers  # bench/ is not a package

from fleettrust.agent.simulator import (
    SimulationConfig,
    SimulationReport,
    SimulationSnapshot,
    enroll_devices,
    run_simulation,
)
from fleettrust.agent.state import StateStore

PROFILE = Path(tempfile.gettempdir()) / "fleettrust-gateway-profile.txt"
S_TIME_LINE = re.compile(r"(\d+) connections in [\d.]+s;")


def log(message: str) -> None:
    print(message, flush=True)


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def device_credentials(fleet: _servers.Fleet, count: int) -> list[tuple[Path, Path]]:
    """(certificate+chain, key) files of the first ``count`` enrolled devices."""
    found: list[tuple[Path, Path]] = []
    for directory in sorted(fleet.state_root.iterdir()):
        if len(found) >= count:
            break
        try:
            identity = StateStore(directory, durable=False).load(verify_chain_to_root=False)
        except Exception:  # noqa: S112  # skip what does not load
            continue
        if identity.key_path is not None and identity.state.phase == "enrolled":
            found.append((identity.certificate_path, identity.key_path))
    return found


def s_time(port: int, creds: list[tuple[Path, Path]], *, mode: str, seconds: float,
           path: str, server_pids: list[int] | None = None) -> dict[str, Any]:
    """Parallel ``openssl s_time`` clients; connections/s by our wall clock, and per second of
    server CPU time when ``server_pids`` are given (capacity, independent of idle waits)."""
    cpu_before = cpu_seconds(server_pids) if server_pids else 0.0
    procs = []
    started = time.perf_counter()
    for cert, key in creds:
        procs.append(subprocess.Popen(
            ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", mode, "-time",
             str(int(seconds)), "-cert", str(cert), "-key", str(key), "-www", path],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    connections = resumed = 0
    errors: list[str] = []
    for proc in procs:
        out, err = proc.communicate(timeout=seconds + 60)
        match = S_TIME_LINE.search(out)
        if match is None:
            errors.append((err or out)[-300:])
            continue
        connections += int(match.group(1))
        # one mark per connection: "r" resumed, "*" (or "t", "3") a full handshake
        resumed += sum(line.count("r") for line in out.splitlines()
                       if line and set(line) <= set("*rt3"))
    wall = time.perf_counter() - started
    server_cpu = cpu_seconds(server_pids) - cpu_before if server_pids else None
    return {"connections": connections, "seconds": round(wall, 2),
            "per_s": round(connections / wall, 1) if wall > 0 else 0.0,
            "server_cpu_s": None if server_cpu is None else round(server_cpu, 2),
            "per_server_cpu_s": (round(connections / server_cpu, 1)
                                 if server_cpu else None),
            "resumed_share": round(resumed / connections, 3) if connections else None,
            "errors": errors}


def simulate(fleet: _servers.Fleet, url: str, args: argparse.Namespace, *, mode: str,
             devices: int, seconds: float, warmup: bool = False,
             on_progress: Callable[[SimulationSnapshot], None] | None = None
             ) -> SimulationReport:
    return run_simulation(SimulationConfig(
        devices=devices, gateway=url, duration_s=seconds, state_root=fleet.state_root,
        concurrency=args.concurrency, processes=args.sim_processes,
        mode=mode,  # type: ignore[arg-type]
        warmup=warmup, seed=1, progress_interval_s=1.0), on_progress=on_progress)


class CpuWindow:
    """Gateway CPU time over the timed phase only: sampled at the first progress snapshot
    (1 s into the timed phase, after the warm-up) and at the end."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.start: tuple[float, int] | None = None

    def __call__(self, snap: SimulationSnapshot) -> None:
        if snap.phase == "running" and self.start is None:
            self.start = (cpu_seconds(self.pids), snap.checkins_ok + snap.checkins_failed)

    def per_checkin_ms(self, total_checkins: int) -> float | None:
        if self.start is None:
            return None
        cpu, done = self.start
        n = total_checkins - done
        return round((cpu_seconds(self.pids) - cpu) / n * 1000, 3) if n > 0 else None


def profile_worker(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    exe = Path(sys.executable).with_name("py-spy")
    if not exe.exists():
        log("  (py-spy not installed: pip install py-spy; no profile)")
        return None
    return subprocess.Popen([str(exe), "record", "-p", str(pid), "-d", str(int(seconds)),
                             "-r", "200", "-f", "raw", "-o", str(out), "--gil"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


_GENERIC = ("asyncio/", "threading.py", "concurrent/futures", "_servers.py", "runners.py",
            "<module>")


def summarize_profile(path: Path, top: int = 22) -> list[str]:
    """Hottest frames of a py-spy raw profile: self time, then inclusive time of the frames
    that are not event-loop / thread plumbing."""
    total = 0
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            if not any(g in frame for g in _GENERIC):
                inclusive[frame] += n
    if not total:
        return []
    lines = [f"self {n / total * 100:5.1f}%  {frame[:100]}" for frame, n in own.most_common(12)]
    lines += [f"incl {n / total * 100:5.1f}%  {frame[:100]}"
              for frame, n in inclusive.most_common(top)]
    return lines


def bench_db(db: str, args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"db": db, "load_before": load_average()}
    log(f"\n=== {db} ===  (load average {result['load_before']})")
    clock = time.perf_counter()
    fleet = _servers.prepare_fleet(db, base=args.base, fresh=args.fresh)
    api = _servers.serve_api(fleet)
    try:
        have, new = enroll_devices(SimulationConfig(
            devices=args.devices, gateway="https://127.0.0.1:1", duration_s=1.0,
            server=api.info["url"], token=fleet.factory_token, batch_id=fleet.batch_id,
            state_root=fleet.state_root, enroll_chunk=1000))
    finally:
        api.stop()
    registered = _servers.registered_devices(fleet)
    result.update(devices_registered=registered, enrolled_now=new,
                  fleet_s=round(time.perf_counter() - clock, 1))
    log(f"fleet: {registered} devices registered ({new} enrolled now, {have} reused), "
        f"{result['fleet_s']} s")
    creds = device_credentials(fleet, args.clients)

    # (a) full handshakes, the same s_time clients against the gateway and s_server
    handshakes: dict[str, Any] = {}
    gw1 = _servers.serve_gateway(fleet, workers=1, launcher=args.launcher)
    try:
        handshakes["gateway_1_worker"] = s_time(gw1.port, creds, mode="-new",
                                                seconds=args.tls_seconds, path="/healthz",
                                                server_pids=list(gw1.info["workers"]))
        reuse1 = s_time(gw1.port, creds, mode="-reuse", seconds=args.tls_seconds,
                        path="/healthz")
        window1 = CpuWindow(list(gw1.info["workers"]))
        keep1 = simulate(fleet, gw1.info["url"], args, mode="keepalive", devices=args.active,
                         seconds=args.sim_seconds, warmup=True, on_progress=window1)
        keep1_cpu = window1.per_checkin_ms(keep1.checkins_ok + keep1.checkins_failed)
    finally:
        gw1.stop()
    openssl = _servers.serve_openssl(fleet)
    try:
        handshakes["openssl_s_server"] = s_time(openssl.port, creds, mode="-new",
                                                seconds=args.tls_seconds, path="/healthz",
                                                server_pids=[openssl.popen.pid])
    finally:
        openssl.stop()
    gw = _servers.serve_gateway(fleet, workers=args.workers, launcher=args.launcher)
    try:
        handshakes[f"gateway_{args.workers}_workers"] = s_time(
            gw.port, creds, mode="-new", seconds=args.tls_seconds, path="/healthz",
            server_pids=list(gw.info["workers"]))
        reference = handshakes["openssl_s_server"]["per_s"] or float("nan")
        handshakes["ratio_1_worker"] = round(
            handshakes["gateway_1_worker"]["per_s"] / reference, 3)
        handshakes[f"ratio_{args.workers}_workers"] = round(
            handshakes[f"gateway_{args.workers}_workers"]["per_s"] / reference, 3)
        per_cpu = handshakes["openssl_s_server"]["per_server_cpu_s"] or float("nan")
        handshakes["ratio_per_server_cpu_s"] = round(
            (handshakes["gateway_1_worker"]["per_server_cpu_s"] or 0.0) / per_cpu, 3)
        result["full_handshakes"] = handshakes
        log("(a) full mTLS handshakes/s (openssl s_time -new x"
            f"{len(creds)}, {args.tls_seconds:g} s each):")
        for name in ("gateway_1_worker", f"gateway_{args.workers}_workers",
                     "openssl_s_server"):
            h = handshakes[name]
            log(f"    {name:22s} {h['per_s']:8.1f}/s  ({h['connections']} in {h['seconds']} s; "
                f"{h['per_server_cpu_s']} per second of server CPU)"
                + (f"  errors: {h['errors']}" if h["errors"] else ""))
        log(f"    ratio gateway/s_server: 1 worker {handshakes['ratio_1_worker']:.3f}, "
            f"{args.workers} workers {handshakes[f'ratio_{args.workers}_workers']:.3f} "
            "(goal >= 0.8); per second of server CPU, 1 worker: "
            f"{handshakes['ratio_per_server_cpu_s']:.3f}")

        # (b) resumption
        resumption: dict[str, Any] = {
            "gateway_1_worker_s_time_reuse": reuse1,
            f"gateway_{args.workers}_workers_s_time_reuse": s_time(
                gw.port, creds, mode="-reuse", seconds=args.tls_seconds, path="/healthz")}
        # as many devices as concurrent check-ins, so that each device reconnects often
        sim_full = simulate(fleet, gw.info["url"], args, mode="handshake",
                            devices=args.concurrency, seconds=args.sim_seconds)
        sim_resume = simulate(fleet, gw.info["url"], args, mode="resume",
                              devices=args.concurrency, seconds=args.sim_seconds)
        for name, rep in (("simulator_handshake", sim_full), ("simulator_resume", sim_resume)):
            resumption[name] = {
                "handshakes_per_s": rep.handshakes_per_s, "checkins_per_s": rep.checkins_per_s,
                "resumption_rate": rep.resumption_rate, "p50_ms": rep.latency_ms["p50"],
                "p99_ms": rep.latency_ms["p99"], "errors": rep.errors}
        result["resumption"] = resumption
        log("(b) session resumption (s_time -reuse: TLS 1.3 tickets):")
        for name in ("gateway_1_worker_s_time_reuse",
                     f"gateway_{args.workers}_workers_s_time_reuse"):
            reuse = resumption[name]
            log(f"    {name:29s} {reuse['per_s']:8.1f}/s  "
                f"(resumed share {reuse['resumed_share']})")
        for name in ("simulator_handshake", "simulator_resume"):
            r = resumption[name]
            log(f"    {name:29s} {r['handshakes_per_s']:8.1f} connections/s with a check-in "
                f"each, resumed {r['resumption_rate']}, p50 {r['p50_ms']} ms, "
                f"p99 {r['p99_ms']} ms, errors {r['errors'] or 0}")

        # (c) kept-alive check-ins
        workers = list(gw.info["workers"])
        spy = None
        if args.profile:
            spy = profile_worker(workers[0], args.sim_seconds, PROFILE)
        window = CpuWindow(workers)
        keep = simulate(fleet, gw.info["url"], args, mode="keepalive", devices=args.active,
                        seconds=args.sim_seconds, warmup=True, on_progress=window)
        server_cpu_ms = window.per_checkin_ms(keep.checkins_ok + keep.checkins_failed)
        if spy is not None:
            spy.wait(timeout=args.sim_seconds + 60)
    finally:
        gw.stop()
    canned = _servers.serve_canned(fleet)
    try:
        ceiling = simulate(fleet, canned.info["url"], args, mode="keepalive",
                           devices=args.concurrency, seconds=min(args.sim_seconds, 4.0),
                           warmup=True)
    finally:
        canned.stop()
    result["simulator_ceiling"] = {"checkins_per_s": ceiling.checkins_per_s,
                                   "cpu_ms_per_checkin": ceiling.cpu_ms_per_checkin,
                                   "processes": ceiling.processes}
    log(f"(c) kept-alive check-ins ({args.active} devices, concurrency {args.concurrency}, "
        f"{keep.processes} simulator process(es), warm connections; goal >= 3000/s):")
    log(f"    simulator alone (fixed-answer mTLS server): {ceiling.checkins_per_s:8.1f} "
        f"check-ins/s, {ceiling.cpu_ms_per_checkin} ms CPU each, "
        f"{ceiling.processes} process(es)")
    result["keepalive"] = {}
    for workers_n, rep, cpu_ms in ((1, keep1, keep1_cpu), (args.workers, keep, server_cpu_ms)):
        k = {"checkins_per_s": rep.checkins_per_s, "p50_ms": rep.latency_ms["p50"],
             "p99_ms": rep.latency_ms["p99"], "checkins": rep.checkins_ok,
             "errors": rep.errors, "new_connections": rep.connections,
             "server_cpu_ms_per_checkin": cpu_ms,
             "client_cpu_ms_per_checkin": rep.cpu_ms_per_checkin,
             "active_devices": args.active, "concurrency": args.concurrency,
             "gateway_workers": workers_n, "simulator_processes": rep.processes}
        result["keepalive"][f"gateway_{workers_n}_workers"] = k
        log(f"    gateway x{workers_n}: {k['checkins_per_s']:8.1f} check-ins/s  "
            f"p50 {k['p50_ms']} ms  p99 {k['p99_ms']} ms  errors {k['errors'] or 0}  "
            f"CPU/check-in: gateway {cpu_ms} ms, simulator {rep.cpu_ms_per_checkin} ms")
    if args.profile and PROFILE.exists():
        lines = summarize_profile(PROFILE)
        result["profile_top"] = lines
        log("    gateway worker profile (py-spy --gil, inclusive):")
        for line in lines:
            log(f"      {line}")
    result["load_after"] = load_average()
    log(f"load average after: {result['load_after']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--devices", type=int, default=10_000, help="devices registered")
    parser.add_argument("--active", type=int, default=512,
                        help="devices checking in during the simulator phases")
    parser.add_argument("--workers", type=int, default=2, help="gateway worker processes")
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--sim-processes", type=int, default=1)
    parser.add_argument("--clients", type=int, default=8, help="parallel s_time clients")
    parser.add_argument("--tls-seconds", type=float, default=5.0)
    parser.add_argument("--sim-seconds", type=float, default=8.0)
    parser.add_argument("--base", type=Path, default=_servers.DEFAULT_BASE)
    parser.add_argument("--fresh", action="store_true", help="rebuild the cached fleets")
    parser.add_argument("--profile", action="store_true", help="py-spy a gateway worker")
    parser.add_argument("--launcher", choices=("auto", "serve", "fork"), default="auto",
                        help="serve: `fleettrust serve --workers N --gateway-port P` (the whole "
                        "server); fork: bench/_servers.py's gateway-only workers; auto: serve "
                        "when the CLI has --gateway-port")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    if args.launcher == "auto":
        args.launcher = "serve" if _servers.gateway_command() else "fork"
    started = time.perf_counter()
    dbs = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    log(f"fleettrust gateway benchmark: {os.cpu_count()} CPUs, {args.devices} devices "
        f"registered, gateway launched by {args.launcher!r}, loopback only")
    results = [bench_db(db, args) for db in dbs]
    total = round(time.perf_counter() - started, 1)
    log(f"\ntotal {total} s")
    if args.json_out is not None:
        args.json_out.write_text(json.dumps({"results": results, "total_s": total}, indent=2))


if __name__ == "__main__":
    main()
