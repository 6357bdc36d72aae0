"""Tables, targets and plots from a results JSON of bench/run.py.

    python bench/_report.py bench/results/full.json [--markdown] [--plots]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

BACKEND_ORDER = ["shmcache", "shmcache+load", "dict", "lmdb", "redis", "manager", "etcd",
                 "replica", "replica+load"]
BACKEND_LABEL = {
    "shmcache": "shmcache", "shmcache+load": "shmcache, 1k ev/s", "dict": "dict (in-process)",
    "lmdb": "LMDB (txn/get)", "redis": "Redis (redis-py)", "manager": "Manager().dict()",
    "etcd": "etcd direct", "replica": "replica (list+watch)", "replica+load": "replica, 1k ev/s",
}
OP_LABEL = {"get": "get(random key)", "list100": "list(prefix of 100)", "whole": "list(whole range)"}



def _protobuf_implementations(versions: dict[str, Any]) -> str:
    """" (upb; python-etcd3's processes: python (forced ...))" from a stamp that names them."""
    mine = versions.get("protobuf implementation")
    theirs = versions.get("protobuf implementation (python-etcd3's processes)")
    return f" ({mine}; python-etcd3's processes: {theirs})" if mine else ""

def _k(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 else f"{n // 1000}k" if n >= 1000 else str(n)


def _rate(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 1:
        return f"{x:.1f}"
    return f"{x:.2f}"


def _us(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if x >= 1e6:
        return f"{x / 1e6:.2f} s"
    if x >= 1e3:
        return f"{x / 1e3:.1f} ms"
    return f"{x:.1f} µs"


def _md(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _rows(res: dict[str, Any], **match: Any) -> list[dict[str, Any]]:
    return [r for r in res.get("throughput", []) if all(r.get(k) == v for k, v in match.items())]


def one(res: dict[str, Any], backend: str, n: int, k: int, op: str) -> dict[str, Any] | None:
    rows = _rows(res, backend=backend, n=n, k=k, op=op)
    return rows[0] if rows else None


def throughput_table(res: dict[str, Any], n: int) -> str:
    """One table per size: aggregate ops/s (per-reader median) and p50/p99 latency per op."""
    ks = sorted({r["k"] for r in _rows(res, n=n)})
    parts = []
    for op in ("get", "list100", "whole"):
        rows = []
        for b in BACKEND_ORDER:
            cells = []
            any_ = False
            for k in ks:
                r = one(res, b, n, k, op)
                if r is None:
                    cells.append("–")
                    continue
                any_ = True
                cells.append(f"{_rate(r['aggregate_per_s'])} ({_rate(r['per_reader_median'])})"
                             f" {_us(r['p50_us'])}/{_us(r['p99_us'])}")
            if any_:
                rows.append([BACKEND_LABEL.get(b, b)] + cells)
        if rows:
            parts.append(f"**{_k(n)} keys, {OP_LABEL[op]}**: aggregate ops/s (per-reader median)"
                         f" p50/p99 latency\n\n" + _md(["backend"] + [f"K={k}" for k in ks], rows))
    return "\n\n".join(parts)


def _mem_rows(res: dict[str, Any]) -> list[list[str]]:
    rows = []
    for m in res.get("memory", []):
        each = m["each"]
        growth = sorted(e["swept"]["uss_mb"] - e["base"]["uss_mb"] for e in each)
        uss = sorted(e["swept"]["uss_mb"] for e in each)
        pss = sorted(e["swept"]["pss_mb"] for e in each)
        att = sorted(e["attached"]["uss_mb"] - e["base"]["uss_mb"] for e in each)
        w = m["workers"]
        # Totals for 8 workers: measured when 8 ran, else 8 x the median worker (marked ~).
        t_uss = f"{sum(uss):.0f}" if w == 8 else f"~{8 * uss[len(uss) // 2]:.0f}"
        t_pss = f"{sum(pss):.0f}" if w == 8 else f"~{8 * pss[len(pss) // 2]:.0f}"
        rows.append([m["kind"], _k(m["n"]), str(w), f"{att[len(att) // 2]:.1f}",
                     f"{growth[len(growth) // 2]:.1f} (max {growth[-1]:.1f})",
                     f"{uss[len(uss) // 2]:.1f}", f"{pss[len(pss) // 2]:.1f}", t_uss, t_pss])
    return rows


def memory_growth(res: dict[str, Any], kind: str, n: int) -> float | None:
    for m in res.get("memory", []):
        if m["kind"] == kind and m["n"] == n:
            return max(e["swept"]["uss_mb"] - e["base"]["uss_mb"] for e in m["each"])
    return None


def _cold(res: dict[str, Any], kind: str, n: int) -> dict[str, Any] | None:
    for c in res.get("coldstart", []):
        if c["kind"] == kind and c["n"] == n:
            return c
    return None


def cold_ready_ms(res: dict[str, Any], n: int) -> float | None:
    c = _cold(res, "shmcache", n)
    if not c:
        return None
    v = sorted(r["ready_s"] for r in c["runs"])
    return v[-1] * 1000  # the worst of the fresh processes


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of issue 5, evaluated on this run's figures (met / missed / not measured)."""
    out: list[dict[str, Any]] = []
    sizes = sorted({r["n"] for r in res.get("throughput", [])})
    ref = 100_000 if 100_000 in sizes else (sizes[-1] if sizes else 0)

    def add(name: str, ok: bool | None, figure: str) -> None:
        out.append({"target": name, "met": ok, "figure": figure})

    h2h = {h["n"]: h["median"] for h in res.get("head_to_head", [])}

    def rate(b: str, k: int, n: int = ref, op: str = "get", scaling: bool = False
             ) -> float | None:
        # Prefer the interleaved head-to-head rounds (robust to other load on the machine).
        m = h2h.get(n)
        if m is not None and op == "get":
            # single reader: the rotation that interleaves every backend; scaling: the
            # rounds of 1, 2 and K shmcache readers.
            name = f"{b} x1" if k == 1 and not scaling else \
                f"shmcache aggregate x{k}" if b == "shmcache" else None
            if name in m:
                return float(m[name])
        r = one(res, b, n, k, op)
        return r["aggregate_per_s"] if r else None

    s1, lm = rate("shmcache", 1), rate("lmdb", 1)
    add(f"single-reader get/s >= LMDB get/s (txn per get), {_k(ref)} keys",
        None if s1 is None or lm is None else s1 >= lm,
        f"{_rate(s1)} vs {_rate(lm)} /s ({(s1 or 0) / (lm or 1):.2f}x)")
    for n in sizes:
        if n == ref:
            continue
        a, b = rate("shmcache", 1, n), rate("lmdb", 1, n)
        if a and b:
            add(f"  same at {_k(n)} keys", a >= b, f"{_rate(a)} vs {_rate(b)} /s ({a / b:.2f}x)")
    s2 = rate("shmcache", 2, scaling=True)
    kmax = max([k for k in (8, 4, 2) if rate("shmcache", k, scaling=True) is not None] or [2])
    s8 = rate("shmcache", kmax, scaling=True)
    s1 = rate("shmcache", 1, scaling=True)
    cores = {h["n"]: h.get("cores_used", {}) for h in res.get("head_to_head", [])}.get(ref, {})

    def used(k: int) -> str:
        c = cores.get(f"shmcache aggregate x{k}")
        return f"; {k} reader(s) got {c:.2f} cores" if c else ""

    add(f"2 readers >= 1.8x one reader (aggregate get/s), {_k(ref)} keys",
        None if s1 is None or s2 is None else s2 >= 1.8 * s1,
        f"{(s2 or 0) / (s1 or 1):.2f}x ({_rate(s2)} vs {_rate(s1)}{used(2)}{used(1)})")
    add(f"{kmax} readers on 2 cores >= 1.6x one reader (8 wanted), {_k(ref)} keys",
        None if s1 is None or s8 is None else s8 >= 1.6 * s1,
        f"{(s8 or 0) / (s1 or 1):.2f}x ({_rate(s8)} vs {_rate(s1)}{used(kmax)})")
    s1 = rate("shmcache", 1)
    for alt, factor in (("redis", 30), ("manager", 50), ("etcd", 500)):
        a = rate(alt, 1)
        add(f">= {factor}x {BACKEND_LABEL[alt]} (get, 1 reader, {_k(ref)} keys)",
            None if s1 is None or a is None else s1 >= factor * a,
            f"{(s1 or 0) / (a or 1):.1f}x ({_rate(s1)} vs {_rate(a)} /s)")
        a8 = one(res, alt, ref, 8, "get")
        a8 = a8["aggregate_per_s"] if a8 else None
        s8 = (one(res, "shmcache", ref, 8, "get") or {}).get("aggregate_per_s")
        if a8 and s8:
            add("  same with 8 readers", s8 >= factor * a8,
                f"{s8 / a8:.1f}x ({_rate(s8)} vs {_rate(a8)} /s)")
    g = memory_growth(res, "shmcache", 100_000)
    others = {n: memory_growth(res, "shmcache", n) for n in (2_000, 10_000, 1_000_000)}
    others = {n: v for n, v in others.items() if v is not None}
    add("reader memory growth <= 5 MB at 100k keys (USS after a full sweep - before attach)",
        None if g is None else g <= 5.0,
        f"{g:.1f} MB (worst of the workers)" if g is not None else "not measured")
    if others and g is not None:
        spread = ", ".join(f"{_k(n)}: {v:.1f} MB" for n, v in sorted(others.items()))
        worst = max(list(others.values()) + [g])
        add("  ... and independent of key count", worst <= 5.0, spread + f", 100k: {g:.1f} MB")
    c = cold_ready_ms(res, 1_000_000)
    add("attach + first get <= 5 ms at 1M keys (fresh process, worst run)",
        None if c is None else c <= 5.0, f"{c:.2f} ms" if c is not None else "not measured "
        "in this mode" + (f" (100k: {cold_ready_ms(res, 100_000):.2f} ms)"
                          if cold_ready_ms(res, 100_000) is not None else ""))
    for p in res.get("propagation", []):
        a, b = p["shmcache"]["delay_ms"], p["direct"]["delay_ms"]
        if a.get("n") and b.get("n"):
            add(f"propagation p99 <= direct-watch p99 + 1 ms at {p['rate']} puts/s",
                a["p99"] <= b["p99"] + 1.0,
                f"{a['p99']:.2f} vs {b['p99']:.2f} ms (p50 {a['p50']:.2f} vs {b['p50']:.2f})")
    for i in res.get("ingest", []):
        # Against python-etcd3 stopped and continued like the writer (the same etcd
        # path); older results files only have the fresh-watch receive.
        same = i.get("etcd3_receive_stopped", {}).get("rate")
        fresh = i.get("etcd3_receive", {}).get("rate")
        e3 = same or fresh
        add(f"writer ingest >= 0.8x python-etcd3 receive ({_k(i['n'])} keys)",
            None if not e3 else i["writer_rate"] >= 0.8 * e3,
            f"{_rate(i['writer_rate'])} vs {_rate(e3)} events/s "
            f"({i['writer_rate'] / (e3 or 1):.2f}x)"
            + (f"; python-etcd3 on a fresh watch from the past revision: {_rate(fresh)}/s"
               if same and fresh else ""))
    stalls = {s["n"]: s for s in res.get("stall", [])}
    snaps = {}
    for s in res.get("snapshots", []):
        snaps[s["n"]] = max(snaps.get(s["n"], 0.0), s["ms"])
    big = 1_000_000 if 1_000_000 in stalls else (max(stalls) if stalls else None)
    if big is not None:
        st = stalls[big]
        gap = st["shmcache"]["max_gap_ms"]
        worst = st["shmcache"]["delay_ms"].get("max")
        dgap = st["direct"]["max_gap_ms"] or 0.0
        dworst = st["direct"]["delay_ms"].get("max") or 0.0
        add(f"no publish stall > 50 ms while a {_k(big)}-key snapshot is built",
            # The gap is the stall: events stop reaching the watcher. The worst delay
            # also holds etcd's own commit time, which the direct watch shows too.
            None if gap is None else gap <= 50,
            f"longest gap {gap:.0f} ms, worst put->event {worst:.0f} ms at "
            f"{st.get('rate', 1000)} puts/s (direct etcd watch, same window: {dgap:.0f} / "
            f"{dworst:.0f} ms); snapshot build {snaps.get(big, float('nan')):.0f} ms"
            + ("" if big == 1_000_000 else " (1M not measured in this mode)"))
    return out


def targets_table(res: dict[str, Any]) -> str:
    rows = [[t["target"], {True: "met", False: "**missed**", None: "not measured"}[t["met"]],
             t["figure"]] for t in targets(res)]
    return _md(["target", "result", "figure"], rows)


def render_text(res: dict[str, Any]) -> str:
    parts = []
    st = res.get("stamp", {})
    if st:  # (results from before the stamp named protobuf's implementation have no such key)
        v = st.get("versions", {})
        parts.append(f"# shmcache benchmarks, mode {res.get('mode')}, {st.get('when')}\n\n"
                     f"{st['machine']['cpu']}, {st['machine']['cores']} cores, "
                     f"{st['machine']['memory_gib']} GiB; {st.get('python')}; shmcache "
                     f"{v.get('shmcache')} ({(v.get('commit') or '?')[:10]}"
                     f"{', modified' if v.get('shmcache_dirty') else ''}); etcd {st.get('etcd')};"
                     f" redis-server {st.get('redis_server')}; python-etcd3 "
                     f"{v.get('etcd3 (python-etcd3)')}, redis-py {v.get('redis-py')}, "
                     f"py-lmdb {v.get('lmdb (py-lmdb)')}, protobuf {v.get('protobuf')}"
                     + _protobuf_implementations(v))
    fc = res.get("foreign_cpu_cores")
    if fc:
        parts.append("Other processes on this machine (not the benchmark) used on average "
                     + ", ".join(f"{v:.2f} cores during the {_k(int(n))} section"
                                 for n, v in fc.items())
                     + " (of 2): figures measured while they ran are lower and noisier.")
    for h in res.get("head_to_head", []):
        m = h["median"]
        rows = []
        for name, v in sorted(m.items(), key=lambda kv: -kv[1]):
            rs = sorted(h["rates"][name])
            rows.append([name, _rate(v), f"{_rate(rs[0])} – {_rate(rs[-1])}"])
        parts.append(f"**{_k(h['n'])} keys, get/s head-to-head**: {h['rounds']} interleaved "
                     f"rounds of {h['seconds_per_round']} s; median and range of the rounds\n\n"
                     + _md(["contender", "get/s (median)", "range"], rows))
    for n in sorted({r["n"] for r in res.get("throughput", [])}):
        parts.append(throughput_table(res, n))
    mem = _mem_rows(res)
    if mem:
        parts.append("**Memory per worker after a full sweep** (MB; growth = USS after sweep "
                     "- USS before attach; medians over the workers; 8-worker totals summed, "
                     "or ~ 8 x the median where fewer ran)\n\n" +
                     _md(["kind", "keys", "workers", "attach growth", "sweep growth",
                          "USS", "PSS", "USS, 8 workers", "PSS, 8 workers"], mem))
    cold = []
    for c in res.get("coldstart", []):
        ready = sorted(r["ready_s"] * 1000 for r in c["runs"])
        imp = sorted(r["import_s"] * 1000 for r in c["runs"])
        extra = ""
        if c["kind"] == "shmcache" and c["runs"][0].get("reattach"):
            ra = c["runs"][0]["reattach"]
            extra = f"re-attach+get p50 {ra['p50'] * 1000:.2f} ms, p99 {ra['p99'] * 1000:.2f} ms"
        elif "uss_mb" in c["runs"][0]:
            extra = f"USS {c['runs'][0]['uss_mb']:.0f} MB when ready"
        cold.append([c["kind"], _k(c["n"]), str(len(ready)), f"{ready[len(ready) // 2]:.2f}",
                     f"{ready[-1]:.2f}", f"{imp[len(imp) // 2]:.0f}", extra])
    if cold:
        parts.append("**Cold start**: a new process, from attach (shmcache) or from the first "
                     "etcd request (replica) to its first correct get\n\n" +
                     _md(["kind", "keys", "processes", "ready p50 (ms)", "ready max (ms)",
                          "imports (ms)", "notes"], cold))
    prop = []
    for p in res.get("propagation", []) + [dict(s, rate=f"stall {_k(s['n'])}")
                                           for s in res.get("stall", [])]:
        for kind in ("shmcache", "direct"):
            d = p[kind]["delay_ms"]
            if not d.get("n"):
                prop.append([str(p["rate"]), kind, "0", "–", "–", "–", "–", "–"])
                continue
            prop.append([str(p["rate"]), kind, str(d["n"]), f"{d['p50']:.2f}", f"{d['p90']:.2f}",
                         f"{d['p99']:.2f}", f"{d['max']:.1f}",
                         f"{p[kind]['max_gap_ms']:.1f}" if p[kind]["max_gap_ms"] else "–"])
    if prop:
        parts.append("**Propagation** etcd put -> watch event in another process (ms; "
                     "'stall N' rows: the writer republishes its N-key snapshot while "
                     "puts arrive at the stall rate)\n\n"
                     + _md(["puts/s", "watch", "events", "p50", "p90", "p99",
                                             "max", "longest gap"], prop))
    ing = []
    for i in res.get("ingest", []):
        same = i.get("etcd3_receive_stopped", {}).get("rate")
        ing.append([_k(i["n"]), str(i["events"]), _rate(i["writer_rate"]), _rate(same),
                    _rate(i.get("etcd3_receive", {}).get("rate")),
                    _rate(i.get("raw_grpc_receive", {}).get("rate")),
                    f"{i['writer_rate'] / (same or 1):.2f}x" if same else "–"])
    if ing:
        parts.append("**Writer ingest** of a backlog of single-put revisions (events/s; "
                     "'stopped': the receiver's watch was open and its process stopped "
                     "while the backlog was written, as the writer's was; 'fresh': a new "
                     "watch from the past revision)\n\n" +
                     _md(["keys", "events", "shmcache writer (stopped)",
                          "python-etcd3 (stopped)", "python-etcd3 (fresh)",
                          "raw gRPC stream (fresh)", "writer / python-etcd3 (stopped)"], ing))
    sn: dict[int, list[float]] = {}
    for s in res.get("snapshots", []):
        sn.setdefault(s["n"], []).append(s["ms"])
    if sn:
        parts.append("**Snapshot publish time** (writer log; ms)\n\n" + _md(
            ["keys", "snapshots", "min", "median", "max"],
            [[_k(n), str(len(v)), f"{min(v):.0f}", f"{sorted(v)[len(v) // 2]:.0f}",
              f"{max(v):.0f}"] for n, v in sorted(sn.items())]))
    et = etcd_load_rows(res)
    if et:
        parts.append("**etcd load** while K readers run (from etcd's /metrics)\n\n" + _md(
            ["backend", "keys", "K", "watchers on etcd", "Range requests at setup",
             "Range requests/s while reading", "etcd CPU s/s"], et))
    wl = res.get("write_load", [])
    if wl:
        parts.append("Background write load achieved: " + ", ".join(
            f"{_k(w['n'])}: {w['rate']:.0f} puts/s" for w in wl))
    if res.get("skipped"):
        parts.append("Skipped: " + "; ".join(
            f"{s.get('backend')} {s.get('op', s.get('section', ''))} at {_k(s['n'])}"
            f"{' K=' + str(s['k']) if 'k' in s else ''} ({s['reason'][:80]})"
            for s in res["skipped"]))
    parts.append("**Targets (issue 5)**\n\n" + targets_table(res))
    return "\n\n".join(parts)


def etcd_load_rows(res: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in res.get("throughput", []):
        e = r.get("etcd")
        if not e or r["k"] not in (1, 8) or r["backend"] not in ("shmcache", "etcd", "replica"):
            continue
        rd = e["run_delta"]
        secs = e["run_seconds"] or 1
        rows.append([r["backend"], _k(r["n"]), str(r["k"]),
                     f"{e['watchers'] or 0:.0f}",
                     f"{e['setup_delta'].get('grpc_server_handled_total[Range]', 0):.0f}",
                     f"{rd.get('grpc_server_handled_total[Range]', 0) / secs:,.0f}",
                     f"{rd.get('process_cpu_seconds_total', 0) / secs:.2f}"])
    return rows


# -- plots ---------------------------------------------------------------------------------

COLORS = {"shmcache": "#d62728", "shmcache+load": "#ff9896", "dict": "#7f7f7f", "lmdb": "#1f77b4",
          "redis": "#9467bd", "manager": "#8c564b", "etcd": "#2ca02c", "replica": "#ff7f0e",
          "replica+load": "#ffbb78"}


def plots(res: dict[str, Any], outdir: str, mode: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    sizes = sorted({r["n"] for r in res.get("throughput", [])})
    for op in ("get", "list100", "whole") if sizes else ():
        fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4.2), squeeze=False,
                                 sharey=True)
        drew = False
        for ax, n in zip(axes[0], sizes, strict=False):
            for b in BACKEND_ORDER:
                rows = sorted(_rows(res, backend=b, n=n, op=op), key=lambda r: r["k"])
                if rows:
                    drew = True
                    ax.plot([r["k"] for r in rows], [r["aggregate_per_s"] for r in rows],
                            marker="o", color=COLORS.get(b), label=BACKEND_LABEL.get(b, b),
                            linestyle="--" if "load" in b else "-")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks([1, 2, 4, 8])
            ax.set_xticklabels(["1", "2", "4", "8"])
            ax.set_title(f"{OP_LABEL[op]}, {_k(n)} keys")
            ax.set_xlabel("reader processes (2 cores)")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].set_ylabel("aggregate ops/s (log)")
        if drew:
            axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
            fig.tight_layout()
            p = os.path.join(outdir, f"{mode}-throughput-{op}.png")
            fig.savefig(p, dpi=90)
            paths.append(p)
        plt.close(fig)
    h2h = res.get("head_to_head", [])
    if h2h:
        fig, axes = plt.subplots(1, len(h2h), figsize=(5 * len(h2h), 3.6), squeeze=False)
        for ax, h in zip(axes[0], h2h, strict=False):
            items = sorted(((k, v) for k, v in h["median"].items() if k.endswith(" x1")
                            and not k.startswith("shmcache aggregate")), key=lambda kv: kv[1])
            names = [k.removesuffix(" x1") for k, _ in items]
            ax.barh(names, [v for _, v in items],
                    color=[COLORS.get(nm, "#999999") for nm in names])
            for i, (_, v) in enumerate(items):
                ax.text(v, i, f" {_rate(v)}", va="center", fontsize=8)
            ax.set_xscale("log")
            ax.set_xlabel("get/s, one process (median of interleaved rounds, log)")
            ax.set_title(f"single-reader get, {_k(h['n'])} keys")
        fig.tight_layout()
        p = os.path.join(outdir, f"{mode}-get-single-reader.png")
        fig.savefig(p, dpi=90)
        paths.append(p)
        plt.close(fig)
    prop = res.get("propagation", [])
    if prop:
        fig, ax = plt.subplots(figsize=(6, 4))
        rates = [p["rate"] for p in prop]
        for kind, color in (("shmcache", COLORS["shmcache"]), ("direct", COLORS["etcd"])):
            ax.plot(rates, [p[kind]["delay_ms"].get("p50", float("nan")) for p in prop], "o-",
                    color=color, label=f"{kind} p50")
            ax.plot(rates, [p[kind]["delay_ms"].get("p99", float("nan")) for p in prop], "s--",
                    color=color, label=f"{kind} p99")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("puts/s")
        ax.set_ylabel("etcd put -> watch event (ms)")
        ax.set_title("propagation: shmcache watch vs direct etcd watch")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = os.path.join(outdir, f"{mode}-propagation.png")
        fig.savefig(p, dpi=90)
        paths.append(p)
        plt.close(fig)
    mem = res.get("memory", [])
    if mem:
        fig, ax = plt.subplots(figsize=(7, 4))
        labels, uss, pss = [], [], []
        for m in mem:
            labels.append(f"{m['kind']}\n{_k(m['n'])} x{m['workers']}")
            uss.append(sum(e["swept"]["uss_mb"] for e in m["each"]))
            pss.append(sum(e["swept"]["pss_mb"] for e in m["each"]))
        x = range(len(labels))
        ax.bar([i - 0.2 for i in x], uss, 0.4, label="total USS", color="#1f77b4")
        ax.bar([i + 0.2 for i in x], pss, 0.4, label="total PSS", color="#ff7f0e")
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel("MB, summed over the workers")
        ax.set_yscale("log")
        ax.set_title("memory after a full sweep of gets and lists")
        ax.legend()
        fig.tight_layout()
        p = os.path.join(outdir, f"{mode}-memory.png")
        fig.savefig(p, dpi=90)
        paths.append(p)
        plt.close(fig)
    return paths


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs of different sizes (run.py --sizes) as one: list sections concatenated."""
    out: dict[str, Any] = dict(runs[0])
    for r in runs[1:]:
        for k, v in r.items():
            if isinstance(v, list) and isinstance(out.get(k), list):
                out[k] = out[k] + v
            elif isinstance(v, dict) and isinstance(out.get(k), dict) and k in (
                    "foreign_cpu_cores", "timings"):
                out[k] = {**out[k], **v}
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+", help="one or more results JSON files (merged)")
    ap.add_argument("--plots", action="store_true")
    ap.add_argument("--name", default=None, help="plot file prefix (default: the mode)")
    args = ap.parse_args()
    res = merge([json.load(open(p)) for p in args.results])
    print(render_text(res))
    if args.plots:
        for p in plots(res, os.path.dirname(os.path.abspath(args.results[0])),
                       args.name or res["mode"]):
            print("plot:", p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
