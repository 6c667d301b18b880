"""Ray Serve applications of mmrole: the role-playing agent (``serve.agent_app``) and the reward-model judge
(``serve.judge_app``). Start one with ``serve run serve/agent_cpu.yaml`` from the repository root.

The request logic lives in :mod:`mmrole.serving` (no Ray); these modules are the Ray shell around it.
"""
