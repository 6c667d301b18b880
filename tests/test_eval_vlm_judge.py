"""The local reward-model judge: re-asks with sampling and new seeds, per-request failures, and (when the VLM
layer is there) a tiny random-weight model whose unparsable replies are recorded as failures, not zeros."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Optional

import pytest

from mmrole.eval.aggregate import rows_from_results, summarize
from mmrole.eval.contract import expand_requests
from mmrole.eval.formats import AnswerRecord
from mmrole.eval.judges import VLMJudge
from mmrole.eval.metrics import METRICS
from mmrole.eval.store import ResultsStore


@dataclass
class Params:  # the shape of mmrole.models.GenerationParams that VLMJudge relies on
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = 5


class StubVLM:
    """Replies by (sample id of the judge prompt, call number); records params and batch sizes."""

    def __init__(self, script):
        self.script = script
        self.calls = []

    def encode_prompts(self, samples, images, params):
        assert len(samples) == len(images) and all(im.size == (20, 10) for im in images)
        return [self.encode(s) for s in samples]

    def encode(self, sample):
        return sample

    def generate_encoded(self, prompts, params):
        self.calls.append((len(prompts), params))
        return [self.script(s, len(self.calls) - 1) for s in prompts]


@pytest.fixture()
def images(tmp_path):
    from PIL import Image

    root = tmp_path / "images"
    root.mkdir()
    for i in range(2):
        Image.new("RGB", (20, 10), (i * 100, 0, 0)).save(root / f"{i}.png")
    return root


def _answers(n=2, question="Talk about the picture."):
    return [
        AnswerRecord(
            id=f"s{i}",
            question=f"{question} ({i})",
            reference=f"ref {i}",
            answer=f"ans {i}",
            image=f"{i}.png",
            role="Iron Man",
            other_role="a curious human",
            set_name="in-test",
            dialogue_type="comment",
        )
        for i in range(n)
    ]


def test_reasks_unparsable_with_sampling_and_new_seeds(images):
    def script(sample, call):
        if "::Fluency" in sample.id:
            return "blah blah"  # never parses
        if "::Coherency" in sample.id and call == 0:
            return "hmm"  # parses on the re-ask
        if "::Tone Consistency" in sample.id:
            return "[Scores]: (4, 0)"  # B = 0: recorded, not re-asked
        return "good [Scores]: (6, 8)"

    vlm = StubVLM(script)
    judge = VLMJudge(vlm, Params(), max_retries=2, images_root=str(images))
    reqs = expand_requests(_answers(2))
    res = {r.key: r for r in judge.score_batch(reqs)}
    assert [n for n, _ in vlm.calls] == [16, 4, 2]  # all, then 2 Fluency + 2 Coherency, then 2 Fluency
    first, second, third = (p for _, p in vlm.calls)
    assert not first.do_sample and first.seed == 5
    assert (second.do_sample, second.temperature, second.seed) == (True, 0.7, 6)
    assert (third.do_sample, third.seed) == (True, 7)
    flu = res[("s0", "Fluency")]
    assert not flu.ok and flu.attempts == 3 and flu.review == "blah blah" and flu.ratio is None
    assert flu.error.startswith("unparsable after 3 replies")
    assert res[("s1", "Coherency")].ok and res[("s1", "Coherency")].attempts == 2
    tone = res[("s0", "Tone Consistency")]
    assert not tone.ok and tone.attempts == 1 and "is 0" in tone.error
    assert res[("s0", "Instruction Adherence")].ratio == 0.75


def test_bad_image_and_too_long_prompt_fail_alone(images):
    class TooLong(ValueError):
        pass

    class PickyVLM(StubVLM):
        def encode(self, sample):  # like SampleTooLong: the prompt of sample 1 is rejected when encoded
            return TooLong("prompt too long") if "(1)" in sample.user_text else sample

        def generate_encoded(self, prompts, params):
            self.tried.append(len(prompts))
            if any("(3)" in p.user_text for p in prompts):  # a batch-level ValueError: retried one by one
                if len(prompts) > 1:
                    raise ValueError("batch cannot be generated")
                raise ValueError("odd prompt")
            return super().generate_encoded(prompts, params)

    answers = _answers(4)
    answers[2].image = "nope.png"
    answers[3].image = "0.png"
    vlm = PickyVLM(lambda s, c: "[Scores]: (8, 8)")
    vlm.tried = []
    res = VLMJudge(vlm, Params(), max_retries=1, images_root=str(images)).score_batch(expand_requests(answers))
    by_sample = {sid: [r for r in res if r.sample_id == sid] for sid in ("s0", "s1", "s2", "s3")}
    assert all(r.ok for r in by_sample["s0"])
    assert all(not r.ok and r.error.startswith("prompt: TooLong") for r in by_sample["s1"])
    assert all(not r.ok and r.error.startswith("image:") and "not found" in r.error for r in by_sample["s2"])
    assert all(not r.ok and r.error == "generate: ValueError: odd prompt" for r in by_sample["s3"])
    # The rejected prompt did not make the batch fall back to one by one: first call = the 16 prompts of s0 + s3.
    assert vlm.tried == [16] + [1] * 16

    class Broken(StubVLM):
        def generate_encoded(self, prompts, params):
            raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):  # not a per-sample problem: surfaces
        VLMJudge(Broken(None), Params(), images_root=str(images)).score_batch(expand_requests(_answers(1)))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("mmrole.models") is None, reason="mmrole.models not built yet")
def test_tiny_vlm_judge_records_unparsable_replies_as_failures(images, tmp_path):
    pytest.importorskip("torch")
    from mmrole.models import GenerationParams, VLMConfig, build_vlm, make_tiny_vlm

    model_dir = make_tiny_vlm(tmp_path / "tiny", family="qwen2_5_vl")
    vlm = build_vlm(VLMConfig(model_path=str(model_dir), device="cpu"))
    # A compact replacement template keeps the CPU prompt short (the packaged one is ~700 tiny-tokenizer tokens).
    import yaml

    from mmrole.eval.template_loader import load_judge_template

    tpl_path = tmp_path / "short_judge.yaml"
    tpl_path.write_text(
        yaml.safe_dump(
            {
                "system": "Judge.",
                "prompt": "{question}\nA: {answer_a}\nB: {answer_b}\n{metric}: {metric_description}\n[Scores]: (A, B)",
                "metrics": {m: m.lower() for m in METRICS},
            }
        )
    )
    judge = VLMJudge(
        vlm,
        GenerationParams(max_new_tokens=8, seed=0),
        max_retries=1,
        images_root=str(images),
        name="tiny",
        template=load_judge_template(tpl_path),
    )
    answers = _answers(2, question="Hello there.")
    reqs = expand_requests(answers)
    store = ResultsStore(tmp_path / "r.jsonl")
    from mmrole.eval.pipeline import score_requests

    summary = score_requests(reqs, judge, store, batch_size=16)
    results = store.load()
    assert summary.n_scored == 16 and len(results) == 16
    assert store.audit(r.key for r in reqs).complete
    for r in results.values():
        # a random model does not write "[Scores]: (A, B)": each reply is a recorded failure with its raw text
        assert not r.ok and r.score_a is None and r.attempts == 2 and r.judge == "tiny"
        assert "unparsable after 2 replies" in r.error
        assert isinstance(r.review, str)
    (g,) = summarize(rows_from_results(answers, results, "tiny"))
    assert g.n_failed == 16 and all(g.metrics[m].mean is None for m in METRICS) and g.overall is None
