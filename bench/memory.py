"""Process memory from /proc (Linux), for the benchmarks."""


def rss_mb():
  """(current, peak) resident set size of this process, MiB."""
  with open("/proc/self/status") as f:
    fields = dict(line.split(":", 1) for line in f)
  return (int(fields["VmRSS"].split()[0]) / 1024,
          int(fields["VmHWM"].split()[0]) / 1024)
