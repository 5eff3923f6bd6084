"""Throughput and memory: FLOPs/MFU/HFU (``flops``), memory models (``memory``), measurement
(``measure``), the layout planner (``plan``), the benchmark worker and sweep (``worker``,
``sweep``) and model presets (``presets``). Each module cites its formulas."""
