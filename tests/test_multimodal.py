"""Image prompts on a vision-language model (the tiny Qwen3-VL): LLaMA-Factory's ``images`` column and
``<image>`` placeholders, pixel inputs through rollout and every forward pass, image paths to the judge.

The images are examples/data/images/*.png (32x32 shapes); the tiny model's image processor resizes
them to 56x56, four image tokens each.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil

import pytest
import torch

from alignkit.algos import logprobs_from_logits
from alignkit.config import ConfigError, load_config
from alignkit.data.chat_format import ChatFormat
from alignkit.data.collators import SFTCollator, pad_left
from alignkit.data.encode import encode_prompt, encode_supervised_examples
from alignkit.data.loader import DataError, load_examples
from alignkit.data.vision import PixelRows, VisionProcessor, fit_pixels
from alignkit.generation import HFEngine, SamplingParams
from alignkit.judge.process import JudgeProcess
from alignkit.models.actor_critic import ActorCritic
from alignkit.models.loading import load_causal_lm, load_tokenizer
from alignkit.models.tiny import build_tiny
from alignkit.rewards.api.presets import AlignkitPreset, CustomPreset, OpenAIJudgePreset
from alignkit.train import dpo, ppo, rm, sft
from alignkit.train.tracking import read_metrics
from tests.conftest import EXAMPLES

DATA = EXAMPLES / "data"
IMAGES = DATA / "images"


@pytest.fixture(scope="module")
def vl_model(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("qwen3_vl") / "model", arch="qwen3_vl", hidden_size=64,
                      intermediate_size=128, num_layers=2, pretrain_steps=30)


@pytest.fixture(scope="module")
def vl(vl_model):
    tokenizer = load_tokenizer(str(vl_model))
    return tokenizer, VisionProcessor.load(vl_model, tokenizer), load_causal_lm(str(vl_model)).eval()


def prompt_batch(tokenizer, vision, examples):
    queries = [encode_prompt(ChatFormat.named(tokenizer, "chatml", vision=vision), ex, 256) for ex in examples]
    ids, mask = pad_left(queries, tokenizer.pad_token_id)
    return ids, mask, PixelRows.build(vision, [ex.images for ex in examples])


def test_tiny_vl_checkpoint_has_an_image_processor(vl_model, vl):
    tokenizer, vision, _ = vl
    assert (vl_model / "preprocessor_config.json").is_file()
    assert vision is not None and vision.pad == "<|image_pad|>"
    grid = vision.encode([str(IMAGES / "red_square.png")])["image_grid_thw"]
    assert grid.tolist() == [[1, 4, 4]] and vision.num_tokens(grid) == [4]
    # A text-only checkpoint has no processor: image rows on it are an error (test_bad_image_rows).
    assert VisionProcessor.load(build_tiny(vl_model.parent / "text", arch="qwen3", hidden_size=32, num_layers=1,
                                           pretrain_steps=0), tokenizer) is None


def test_placeholders_become_image_tokens(vl):
    tokenizer, vision, _ = vl
    ex = load_examples("mm_prompts_demo", str(DATA), "prompt")[6]  # "<image> or <image>: which one is round?"
    assert [p.rsplit("/", 1)[1] for p in ex.images] == ["red_square.png", "blue_circle.png"]
    text = tokenizer.decode(encode_prompt(ChatFormat.named(tokenizer, "chatml", vision=vision), ex, 256))
    image = "<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>"
    assert f"<|im_start|>user\n{image} or {image}: which one is round?<|im_end|>" in text


def test_the_image_changes_the_response_distribution(vl):
    """Same text, two images: the log-probs of one fixed response differ, so the pixels reach the model."""
    tokenizer, vision, lm = vl
    red = load_examples("mm_prompts_demo", str(DATA), "prompt")[0]
    blue = dataclasses.replace(red, images=[str(IMAGES / "blue_circle.png")])
    ids, mask, pixels = prompt_batch(tokenizer, vision, [red, blue])
    assert torch.equal(ids[0], ids[1])  # the very same tokens
    response = torch.tensor(tokenizer.encode("The picture shows a shape.<|im_end|>"))[None].repeat(2, 1)
    full, full_mask = torch.cat([ids, response], 1), torch.cat([mask, torch.ones_like(response)], 1)
    ac = ActorCritic(lm, value_head=False)
    with torch.no_grad():
        logp = logprobs_from_logits(ac(full, full_mask, ids.shape[1], pixels.select([0, 1]))[0], response, 1.0)
        text_only = logprobs_from_logits(ac(full, full_mask, ids.shape[1])[0], response, 1.0)
    assert (logp[0] - logp[1]).abs().max() > 1e-3, "the image did not change the response's log-probs"
    assert not torch.allclose(logp[0], text_only[0]), "the pixels were ignored"


def test_rollout_and_training_forward_agree_on_image_prompts(vl):
    """Tokens sampled with the KV cache (3-D rope positions from the prompt's images, left padding,
    rows with 0, 1 and 2 images in one batch) get the same log-probs from the full forward pass."""
    tokenizer, vision, lm = vl
    examples = load_examples("mm_prompts_demo", str(DATA), "prompt")
    ids, mask, pixels = prompt_batch(tokenizer, vision, examples)
    engine = HFEngine(lm, tokenizer.pad_token_id, with_logprobs=True)
    torch.manual_seed(0)
    rows = pixels.select(range(len(examples)))
    roll = engine.generate(ids, mask, SamplingParams(8, (tokenizer.eos_token_id,)), pixels=rows)
    assert not (roll.input_ids[:, roll.query_len:] == vision.image_token_id).any(), "an image token was sampled"
    with torch.no_grad():
        logits = ActorCritic(lm, value_head=False)(roll.input_ids, roll.attention_mask, roll.query_len, rows)[0]
    logits[..., list(engine.suppress_ids)] = float("-inf")  # the sampler never draws image placeholders
    logp = logprobs_from_logits(logits, roll.input_ids[:, roll.query_len:], 1.0)
    assert ((logp - roll.logprobs).abs() * roll.response_mask).max() < 1e-4


def write_rows(tmp_path, rows, entry_columns):
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    (tmp_path / "dataset_info.json").write_text(json.dumps(
        {"bad": {"file_name": "rows.json", "formatting": "sharegpt", "columns": entry_columns}}))


@pytest.mark.parametrize("images, text, expected", [
    (["images/nowhere.png"], "<image>Hi", r"row 0: image 'images/nowhere.png' not found .*relative to dataset_dir"),
    (["images/red_square.png"], "Hi, no placeholder", r"row 0: 1 image\(s\) in 'pics' but 0 <image> placeholder"),
    (["images/red_square.png"], "<image><image>Hi", r"row 0: 1 image\(s\) in 'pics' but 2 <image> placeholder"),
    ("images/red_square.png", "<image>Hi", None),  # one path as a plain string is fine
])
def test_bad_image_rows(tmp_path, images, text, expected):
    (tmp_path / "images").symlink_to(IMAGES)
    write_rows(tmp_path, [{"conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "Yes."}],
                           "pics": images}], {"messages": "conversations", "images": "pics"})
    if expected is None:
        assert load_examples("bad", str(tmp_path), "sft")[0].images == [str((IMAGES / "red_square.png").resolve())]
        return
    with pytest.raises(DataError, match=rf"rows.json: {expected}"):
        load_examples("bad", str(tmp_path), "sft")


def test_images_on_a_text_only_model_name_the_row(tmp_path_factory, tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    ex = load_examples("mm_prompts_demo", str(DATA), "prompt")[0]
    vision = VisionProcessor.load(tiny_model_dir, tokenizer)
    with pytest.raises(DataError, match=r"mm_prompts_demo.json:0: this row has 1 image\(s\), but the model takes "
                                        r"no images.*drop the 'images' column"):
        encode_prompt(ChatFormat.named(tokenizer, "chatml", vision=vision), ex, 256)


def test_cutoff_through_an_image_is_an_error(vl):
    tokenizer, vision, _ = vl
    ex = load_examples("mm_prompts_demo", str(DATA), "prompt")[1]  # the image comes last: "... shape? <image>"
    ex = dataclasses.replace(ex, messages=[{"role": "user", "content": "<image>" + ex.messages[0]["content"][:-7]}])
    with pytest.raises(DataError, match="cutoff_len cuts through this row's images"):
        encode_prompt(ChatFormat.named(tokenizer, "chatml", vision=vision), ex, 12)


def test_reward_requests_carry_the_image_references():
    """alignkit: an images list of paths; custom: wherever the payload says "{images}"; openai_judge:
    image_url content parts with data: URLs (an API cannot read the trainer's disk)."""
    red = str(IMAGES / "red_square.png")
    item, text_item = ("<image>What is it?", "A square.", None, (red,)), ("Hi", "Hello.", None, ())
    assert AlignkitPreset().build([item, text_item])["items"] == [
        {"prompt": "<image>What is it?", "response": "A square.", "label": None, "images": [red]},
        {"prompt": "Hi", "response": "Hello.", "label": None}]
    custom = CustomPreset({"q": "{prompt}", "a": "{response}", "pics": "{images}"}, None, "score", None)
    assert custom.build([item])["pics"] == [red]
    content = OpenAIJudgePreset("judge", "{prompt} -> {response}", r"\d+").build([item])["messages"][0]["content"]
    assert content[0] == {"type": "text", "text": "<image>What is it? -> A square."}
    assert content[1]["image_url"]["url"].startswith("data:image/png;base64,iVBOR")  # the PNG's own bytes
    assert OpenAIJudgePreset("judge", "{prompt}", r"\d+").build([text_item])["messages"][0]["content"] == "Hi"


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["grpo_tiny.yaml", "ppo_tiny.yaml"])
def test_rl_with_image_prompts_against_the_judge(vl_model, tmp_path, recipe):
    """Two GRPO (or PPO with a value head) steps on image prompts against the judge server, which
    records the image paths it was sent (rollout/forward agreement: test_rollout_and_training_...)."""
    with JudgeProcess(rule="count_good") as judge:
        cfg = load_config(EXAMPLES / recipe, [
            f"model_name_or_path={vl_model}", "adapter_name_or_path=null", f"output_dir={tmp_path / 'grpo'}",
            f"dataset_dir={DATA}", "dataset=mm_prompts_demo", "report_to=none", "plot_loss=false",
            "reward_model_type=api", f"reward_model={judge.url}/score", "reward_api.max_retries=0",
            "max_steps=2", "num_generations=2", "per_device_train_batch_size=2", "ppo_buffer_size=2",
            "max_new_tokens=6", "save_steps=100", "lora_target=all", "ppo_epochs=1"])
        run = ppo.run(cfg)
        stats = judge.stats()
    rows = [r for r in read_metrics(run) if "env/reward_mean" in r]
    assert len(rows) == 2 and all(r["reward/failures"] == 0 for r in rows)
    assert all(r["ppo/loss/total"] == r["ppo/loss/total"] for r in rows)  # an update ran (not NaN)
    sent = stats["images"]
    assert sent and all(p.startswith(str(IMAGES.resolve())) for p in sent), sent
    # Each prompt's group (2 samples) carries its image: 4 prompts a step, 2 steps.
    assert sum(sent.values()) >= 2 * 2 * 2


@pytest.mark.slow
def test_sft_with_images_three_steps(vl_model, tmp_path):
    cfg = load_config(None, [
        "stage=sft", f"model_name_or_path={vl_model}", "dataset=mm_sft_demo", f"dataset_dir={DATA}",
        "template=chatml", f"output_dir={tmp_path / 'sft'}", "per_device_train_batch_size=2", "learning_rate=5e-3",
        "max_steps=3", "logging_steps=1", "save_steps=100", "lora_rank=4", "lora_target=all", "report_to=none",
        "plot_loss=false"])
    out = sft.run(cfg)
    losses = [r["train/loss"] for r in read_metrics(out) if "train/loss" in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


def test_sft_batches_carry_pixels_for_their_image_rows(vl):
    tokenizer, vision, _ = vl
    examples = load_examples("mm_sft_demo", str(DATA), "sft")
    feats = encode_supervised_examples(ChatFormat.named(tokenizer, "chatml", vision=vision), examples, 256)
    batch = SFTCollator(tokenizer.pad_token_id, vision)([feats[6], feats[7]])  # two images, then a text row
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]] and batch["pixel_values"].shape[0] == 32
    assert batch["mm_token_type_ids"].sum(-1).tolist() == [8, 0]
    assert "pixel_values" not in SFTCollator(tokenizer.pad_token_id, vision)([feats[7]])  # text stays text


def preference_config(stage, model, out, *extra):
    return load_config(EXAMPLES / f"{stage}_tiny.yaml", [
        f"model_name_or_path={model}", "dataset=mm_prefs_demo", f"dataset_dir={DATA}", f"output_dir={out}",
        "report_to=none", "plot_loss=false", "per_device_train_batch_size=2", "max_steps=2", "logging_steps=1",
        "save_steps=100", "val_size=0", "eval_strategy=no", *extra])


@pytest.mark.slow
def test_dpo_and_rm_with_images(vl_model, tmp_path):
    out = dpo.run(preference_config("dpo", vl_model, tmp_path / "dpo"))
    margins = [r["train/rewards/margins"] for r in read_metrics(out) if "train/rewards/margins" in r]
    assert len(margins) == 2 and all(torch.isfinite(torch.tensor(margins)))
    out = rm.run(preference_config("rm", vl_model, tmp_path / "rm"))
    losses = [r["train/loss"] for r in read_metrics(out) if "train/loss" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


# -- image_max_pixels / image_min_pixels, as LLaMA-Factory resizes -------------------------


@pytest.fixture(scope="module")
def big_processor_model(vl_model, tmp_path_factory):
    """The tiny VL checkpoint with Qwen2-VL's real processor limit (12845056 pixels), so only
    image_max_pixels stands between a large image and its full token count."""
    out = tmp_path_factory.mktemp("vl_big") / "model"
    shutil.copytree(vl_model, out)
    cfg = json.loads((out / "preprocessor_config.json").read_text())
    cfg["size"] = {"longest_edge": 12845056, "shortest_edge": 3136}
    (out / "preprocessor_config.json").write_text(json.dumps(cfg))
    return out


def test_image_max_pixels_caps_image_tokens_as_llamafactory(big_processor_model, tmp_path):
    from PIL import Image

    tokenizer = load_tokenizer(str(big_processor_model))
    Image.new("RGB", (1024, 1024), (200, 10, 10)).save(tmp_path / "big.png")
    Image.new("RGB", (512, 512), (200, 10, 10)).save(tmp_path / "half.png")

    def tokens(path, *limits):
        vision = VisionProcessor.load(big_processor_model, tokenizer, *limits)
        return vision.num_tokens(vision.encode([str(path)])["image_grid_thw"])[0]

    assert tokens(tmp_path / "big.png", 2**62) == 1369  # uncapped: (1036 / 28)^2
    assert tokens(tmp_path / "big.png") == 729  # LLaMA-Factory's default 768*768 -> 768x768 -> (756 / 28)^2
    # LLaMA-Factory scales 1024^2 by sqrt(262144 / 1024^2) = 0.5: the same tokens as a 512x512 image.
    assert tokens(tmp_path / "big.png", 262144) == tokens(tmp_path / "half.png", 2**62) == 324


def test_fit_pixels_follows_llamafactory():
    from PIL import Image

    assert fit_pixels(Image.new("RGB", (1000, 500)), 125000, 1024).size == (500, 250)
    assert fit_pixels(Image.new("RGB", (10, 10)), 768 * 768, 32 * 32).size == (32, 32)  # min_pixels, then >= 28
    assert fit_pixels(Image.new("RGB", (20, 100)), 768 * 768, 1).size == (28, 100)
    assert fit_pixels(Image.new("RGB", (30000, 100)), 2**62, 1).size == (18000, 100)  # aspect over 200:1


def test_image_pixel_keys_are_config_keys_and_video_keys_are_refused(vl_model, tmp_path, caplog):
    base = ["stage=sft", f"model_name_or_path={vl_model}", "dataset=mm_sft_demo", f"dataset_dir={DATA}",
            f"output_dir={tmp_path}"]
    with caplog.at_level(logging.WARNING, logger="alignkit.config"):
        cfg = load_config(None, [*base, "image_max_pixels=262144", "image_min_pixels=1024"])
    assert (cfg.image_max_pixels, cfg.image_min_pixels) == (262144, 1024) and "image_m" not in caplog.text
    with pytest.raises(ConfigError, match=r"key 'video_max_pixels' is not supported \(videos and audio"):
        load_config(None, [*base, "video_max_pixels=65536"])
