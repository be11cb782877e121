"""How busy the machine was, besides the benchmark itself, while the benchmark timed (Linux: /proc).

A ratio measured on a busy machine is not a ratio of the two libraries. On the 2-core machine of
benchmarks/README.md, one other process spinning on a core slowed PyTorch's training step (the tutorial GPT
at (8, 128)) 2.6x and npgpt's five-line loop 2.0x, so the ratio fell from 0.76x to 0.58x: PyTorch's OpenMP
threads each own a fixed share of an op and wait for the slowest, while the C kernels' pool hands the next
chunk to whichever thread is free. The suite
therefore records, for each timed section, the share of the machine's CPU time that went elsewhere:

    other = (CPU time the whole machine spent busy - the benchmark's own processes' CPU time) / machine time
    steal = time the hypervisor gave this machine's virtual CPUs to someone else / machine time

Machine times come from /proc/stat (all CPUs, in clock ticks); the benchmark's own from /proc/PID/stat of
each live worker (the speed suite's, the quality suite's two runs) and of the children each has waited for,
and from getrusage for this process and for the children it has already waited for. A section whose `other` or `steal` passes BUSY is flagged in the printed report.
Where /proc is missing (macOS, Windows) nothing is measured and the report says so.
"""

import os
import resource

BUSY = 0.05                 # a share of the machine's CPU time above which a section's ratios are suspect


def machine_ticks(stat_text):
    """(busy, steal, total) clock ticks of all CPUs from the text of /proc/stat.

    Its first line: cpu user nice system idle iowait irq softirq steal [guest guest_nice]; guest time is
    already inside user and nice."""
    fields = stat_text.splitlines()[0].split()
    if fields[0] != "cpu":
        raise ValueError("/proc/stat does not start with the 'cpu' line")
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in (fields[1:9] + ["0"] * 8)[:8])
    busy = user + nice + system + irq + softirq
    return busy, steal, busy + idle + iowait + steal


def process_ticks(pid_stat_text):
    """utime + stime + cutime + cstime (clock ticks) from the text of /proc/PID/stat: the process's own
    threads and the children it has waited for. (A torch.compile worker's first step runs the C++ compiler in
    such children: 27 s of CPU for the tutorial GPT, on top of the worker's own 15.) The command name in
    brackets may itself hold spaces and brackets, so the fields are counted from the last ')'."""
    fields = pid_stat_text[pid_stat_text.rindex(")") + 2:].split()
    return sum(int(f) for f in fields[11:15])       # fields 14 to 17 of proc(5); fields[0] is field 3


def _read(path):
    with open(path, encoding="ascii") as f:
        return f.read()


def available():
    return os.path.exists("/proc/stat")


class LoadMeter:
    """with LoadMeter(pids) as load: ...  then load.other, load.steal (shares of the machine's CPU time) and
    load.own_seconds (CPU time of this process, of `pids` and of children waited for meanwhile).

    pids: the benchmark's processes that are alive at the start (its workers); one that exits inside the
    section counts through getrusage once it has been waited for."""

    def __init__(self, pids=()):
        self.pids = list(pids)
        self.other = self.steal = self.own_seconds = None

    def _snapshot(self):
        busy, steal, total = machine_ticks(_read("/proc/stat"))
        own = 0
        for pid in self.pids:
            try:
                own += process_ticks(_read(f"/proc/{pid}/stat"))
            except (OSError, ValueError):
                pass            # exited; its time arrives through RUSAGE_CHILDREN once waited for
        ticks_per_s = os.sysconf("SC_CLK_TCK")
        rusage_s = sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                          resource.getrusage(resource.RUSAGE_CHILDREN)))
        return busy, steal, total, own / ticks_per_s + rusage_s

    def __enter__(self):
        self._start = self._snapshot() if available() else None
        return self

    def __exit__(self, *exc):
        if self._start is None:
            return False
        busy, steal, total, own = (b - a for a, b in zip(self._start, self._snapshot()))
        ticks_per_s = os.sysconf("SC_CLK_TCK")
        self.own_seconds = own
        if total > 0:
            self.other = max(0.0, (busy - own * ticks_per_s) / total)
            self.steal = steal / total
        return False

    def as_dict(self):
        return {"other": self.other, "steal": self.steal, "own_seconds": self.own_seconds}


def busy(load):
    """Whether a recorded section (LoadMeter.as_dict()) was on a busy machine."""
    return bool(load) and any((load.get(k) or 0) > BUSY for k in ("other", "steal"))


SPEED_CONSEQUENCE = ("contention slows PyTorch's threads more than npgpt's pool, so those ratios favour npgpt; "
                     "rerun on a quiet machine.")


def describe(loads, consequence=SPEED_CONSEQUENCE):
    """One sentence on the load of the sections in `loads` ({name: LoadMeter.as_dict()}), and `consequence`
    where one of them was busy."""
    measured = {name: load for name, load in loads.items() if load and load.get("other") is not None}
    if not measured:
        return "Load from outside the benchmark: not measured (no /proc/stat on this system)."
    parts = ", ".join(f"{name} {load['other'] * 100:.1f}%" + (f" (steal {load['steal'] * 100:.1f}%)"
                                                              if load["steal"] >= 0.001 else "")
                      for name, load in measured.items())
    text = f"Load from outside the benchmark, as a share of the machine's CPU time: {parts}."
    flagged = [name for name, load in measured.items() if busy(load)]
    if flagged:
        text += f" BUSY during {', '.join(flagged)}: {consequence}"
    return text
