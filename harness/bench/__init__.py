"""`mmlora bench`: timings, throughput, GB/s, TFLOP/s and % of roofline for the runtime's kernels and for
vision tower + connector (+ LM prefill) end to end, against the other LoRA providers (runtime/providers).

One job per module:
  schema    the CSV's fixed column set, row keys, value formatting
  roofline  GPU profiles (HBM TB/s, bf16 TFLOP/s), detection, byte / flop formulas
  timing    do_bench on CUDA, a perf_counter loop on CPU; p50 / p20 / p80 and peak memory
  case      what a case is: the call to time for a point and provider, the work it does
  catalog   every case by name: the kernel cases and the end-to-end ones
  kernel_cases  one case per kernel spec (LoRA shrink / expand / apply, position_pool, pixel_shuffle,
            rope_2d), each timed with the LoRA providers of runtime/providers that apply to it
  e2e       end-to-end cases built from real-size or tiny configs with random weights
  presets   which points each preset sweeps (smoke / nightly / full)
  sweep     running points: metrics, OOM and error rows, progress
  store     results.csv appended in place (fsync), resume, the .incomplete marker
  baseline  regression table against a baseline CSV
  report    index.html with inline PNG plots
  env       environment columns (GPU, driver, library versions, git sha)
  shards    `--shard I/N`: which points a shard runs (a hash of each point's key)
  merge     the `bench-merge` subcommand: the shards' folders into one results.csv + index.html
  cli       the `bench` subcommand
  tune      `python -m harness.bench.tune`: the LoRA kernels' launch configs tuned on this GPU, as a config file
"""
