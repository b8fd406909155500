"""The detection part of ``signscale demo``: a small detector trained on synthetic road scenes, then
scored on held-out ones with the same evaluator real frames use."""

from __future__ import annotations

from typing import Any

from signscale import storage


def demo_detection(out: str, *, classifier: str = "", train_scenes: int = 300, test_scenes: int = 40,
                   steps: int = 240, seed: int = 0, threads: int = 0) -> dict[str, Any]:
    """The detection leg of ``signscale demo``: synthetic scenes -> pack -> train a detector briefly from
    ``classifier``'s features -> evaluate on unseen scenes -> report with annotated pictures.

    About a minute on 2 CPU cores: 240 steps of 8 tiles give a usable detector, enough to see the
    whole path (the figures in docs/detection.md come from a longer run). Returns summary and files.
    """
    from signscale.data.scene_shards import ScenePackConfig, pack_scenes
    from signscale.detection.evaluate import SceneEvalConfig, evaluate_scenes
    from signscale.detection.train import DetTrainConfig, train_detector

    out = out.rstrip("/")
    train = pack_scenes(ScenePackConfig(source=f"scenes-synthetic:?n={train_scenes}&seed={seed + 1}",
                                        out=storage.join(out, "data", "scenes-train"), shard_mb=16))
    test = pack_scenes(ScenePackConfig(source=f"scenes-synthetic:?n={test_scenes}&seed={seed + 1000}",
                                       out=storage.join(out, "data", "scenes-test"), shard_mb=16))
    trained = train_detector(DetTrainConfig(data=(train.url,), out=storage.join(out, "detector"), backbone=classifier,
                                            max_steps=steps, batch_size=8, tile=(224, 160),
                                            warmup_steps=max(1, min(50, steps // 6)),
                                            freeze_stages=2 if classifier else 0, fpn_channels=32, workers=0,
                                            seed=seed, threads=threads, log_every=max(1, steps // 6)))
    report = evaluate_scenes(SceneEvalConfig(detector=trained.model_url, data=test.url, classifier=classifier,
                                             out=storage.join(out, "detection-report"), score_thresh=0.3,
                                             threads=threads))
    return {"summary": f"{train.summary()}\n  {trained.summary()}\n  {report.summary()}",
            "files": {"detector": trained.model_url, **{f"detection {k}": v for k, v in report.files.items()}},
            "metrics": report.metrics}
