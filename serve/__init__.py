"""Ray Serve applications of mmrole: the role-playing agent (``serve.agent_app``) and the reward-model judge
(``serve.judge_app``). Start one with ``serve run serve/agent_cpu.yaml`` from the repository root.

The request logic lives in the :mod:`mmrole.serving` package (no Ray) and the pages in ``mmrole/web``; these
modules are the Ray shell around them: ``engine`` (the batched model, streaming, LoRA adapters on one base),
``common`` (the FastAPI app of a replica: routes, errors, admission, stats), ``agent_app`` and ``judge_app``.
"""
