"""The application: use cases (profile, plan, compare, apply, evaluate, the demo), the CLI and the HTTP service.

It sits above every layer (it loads models, runs the profiler and the executor, stores results); the
planning core beside it (`bitplan.planner`) imports `db` alone.
"""
