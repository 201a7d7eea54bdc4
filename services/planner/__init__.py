"""`afd plan`: the Step-3 paper's decoding-cost model and an AFD deployment planner.

Pure Python and arithmetic: no torch, no GPU, no network, so it runs wherever a deployment is
being decided. Modules, one noun each:

- `hardware`: accelerators (price, peaks, memory, network), built in or from a file;
- `models`: model shapes, from presets or a checkpoint's config.json;
- `cost`: per-token work and USD per 1M tokens (the paper's section on decoding cost);
- `stages`: per-layer stage times of one AFD micro-batch (roofline over efficiencies);
- `calibration`: measured stage times turned into those efficiencies;
- `deploy`: the search for attention/FFN counts, batch, micro-batches and FFN layout;
- `output`: tables, JSON and Helm values; `plot`: PNG figures (matplotlib, lazily).

The planner knows nothing of the serving code; it only mirrors its deployment knobs.
"""
