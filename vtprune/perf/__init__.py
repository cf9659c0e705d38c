"""``vtprune perf``'s library: what pruning buys in time, memory and FLOPs, measured against references.

``timing`` holds the primitives (synchronized timing, per-token generate clock, peak memory, the eager-attention
peer, ``measure`` / ``compare`` and the per-layer prefill FLOPs count); ``suite`` plans the configurations, runs
the interleaved rounds and derives records and paired ratios; ``oracle`` builds the oracle (the model fed the
already-pruned sequence) and the schedule replay; ``flops`` is the analytic FLOPs / KV-bytes model; ``archs``
builds the published architectures with random weights; ``output`` writes the table, files and plot; ``run`` is
the command's body once its flags are checked (the flags themselves are in ``vtprune.cli.perf``);
``kernel_bench`` benchmarks the compaction kernel. The old ``vtprune.benchmarks.<module>`` paths are aliases
kept for existing scripts. Nothing here is imported by the pruning core.
"""
