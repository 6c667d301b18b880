"""The answering replica (no Ray needed to test it): a sample whose prompt cannot fit the agent, or whose image
is unreadable, fails alone with its reason; the others in the batch are answered."""

from __future__ import annotations

from dataclasses import replace

import numpy as np


def test_too_long_prompt_and_bad_image_fail_alone(tiny_models, demo_prepared):
    from mmrole.data.prepared import images_root, iter_samples
    from mmrole.ray_eval import AnswerWorker

    samples = list(iter_samples(demo_prepared, "test"))[:3]
    long = replace(
        samples[1], user_text=samples[1].user_text + " and on" * 3000, history_lines=[], prompt_head="", prompt_tail=""
    )
    missing = replace(samples[2], image="no/such/image.png")
    rows = [s.to_row() for s in (samples[0], long, missing)]
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    worker = AnswerWorker(
        agent={"model_path": str(tiny_models["agent"]), "device": "cpu", "dtype": "float32", "max_length": 600},
        generation={"max_new_tokens": 4, "min_new_tokens": 1},
        images_root=str(images_root(demo_prepared)),
    )
    out = worker(batch)
    assert list(out["id"]) == [s.id for s in samples]
    assert out["error"][0] == "" and out["answer"][0] != ""
    assert out["answer"][1] == "" and out["error"][1].startswith("prompt: SampleTooLong")
    assert out["answer"][2] == "" and out["error"][2].startswith("image:")
