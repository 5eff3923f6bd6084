"""Every number about a run: FLOPs/MFU/HFU (``flops``), device peaks (``devices``), memory models
(``memory``), communication per layer (``comm``), measurement and the step timer (``measure``),
the layout planner (``plan``), the benchmark worker and sweep (``worker``, ``sweep``), the
trainer's step against a bare loop (``step_compare``) and model presets (``presets``). Each
module cites its formulas."""
