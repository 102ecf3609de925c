"""`eosrl evaluate`: load a checkpoint, run evaluation episodes, report and record them."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from eosrl.launch.config import Config
from eosrl.envs.scores import human_normalized_score
from eosrl.launch.rundir import MetricsWriter, RunDir
from eosrl.launch.builder import EVALUATE_COMMAND_SEED_OFFSET, Builder


def save_gif(frames, path: str | Path, fps: int = 30) -> None:
    """Writes rendered RGB frames as an animated GIF (small frames are enlarged)."""
    from PIL import Image
    images = []
    for frame in frames:
        array = np.asarray(frame)
        if array.dtype != np.uint8:
            array = (np.clip(array, 0.0, 1.0) * 255).astype(np.uint8)
        image = Image.fromarray(array)
        if max(image.size) < 200:  # MinAtar renders 10x10: enlarge so a person can see it
            scale = 200 // max(image.size)
            image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
        images.append(image)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)


def evaluate_checkpoint(config: Config, ckpt: Path, run_path: Optional[Path],
                        episodes: Optional[int] = None, epsilon: Optional[float] = None,
                        video: Optional[str] = None) -> Dict[str, Any]:
    builder = Builder(config)
    learner = builder.make_learner()
    _, meta = builder.restore(learner, ckpt)
    episodes = episodes or config.run.eval_episodes
    evaluator = builder.make_evaluator(EVALUATE_COMMAND_SEED_OFFSET, render=bool(video), epsilon=epsilon)
    epsilon = evaluator.epsilon
    frames: Optional[List[Any]] = [] if video else None
    result = evaluator.run(*learner.acting_params(), episodes=episodes, frames=frames)
    record: Dict[str, Any] = {**result, "epsilon": epsilon, "checkpoint": str(ckpt),
                              "env_steps": meta.get("env_steps"), "learner_step": learner.step}
    if config.env.kind == "atari":
        record["human_normalized_score"] = human_normalized_score(config.env.id, result["return_mean"])
    if video:
        save_gif(frames, video)
        record["video"] = str(video)
    if run_path is not None:
        writer = MetricsWriter(RunDir(run_path), tensorboard=False)
        writer.write("eval", learner.step, source="eosrl evaluate", **{
            k: v for k, v in record.items() if k != "learner_step"})
        writer.close()
    return record


def random_policy_return(config: Config, ckpt: Path, metrics: MetricsWriter) -> float:
    """The mean return of uniformly random actions on the final evaluation's episodes
    (the same env seeds, so the two are paired): the floor a learning curve is read
    against. Written as a `random_policy` event; `eosrl plot` draws it on the returns."""
    record = evaluate_checkpoint(config, ckpt, None, epsilon=1.0)
    metrics.write("event", record["learner_step"], event="random_policy", env_steps=record["env_steps"],
                  **{k: v for k, v in record.items() if k.startswith("return_") or k == "episodes"})
    return record["return_mean"]
