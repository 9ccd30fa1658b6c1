"""``inpaint``'s start image: ``init`` decides what a strength < 1 noises, and nothing at strength 1."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from negdpo.core.fill import classical_fill
from negdpo.generator.sample import inpaint, load_generator


class _EchoPipe:
    """Stands in for a diffusers inpainting pipeline: returns the start images it was handed."""

    vae_scale_factor = 8
    device = "cpu"
    unet = SimpleNamespace(config=SimpleNamespace(block_out_channels=[8], sample_size=8))

    def __call__(self, image, **kwargs):
        self.kwargs = kwargs
        return SimpleNamespace(images=[np.asarray(im, np.float32) / 255.0 for im in image])


def _scan():
    yy, xx = np.mgrid[:64, :64]
    image = (0.2 + 0.6 * xx / 63.0 + 0.05 * np.sin(yy / 3.0)).astype(np.float32)
    mask = (yy - 30) ** 2 + (xx - 34) ** 2 <= 64
    image[mask] = 0.95  # the lesion
    return image, mask


@pytest.mark.parametrize("init", ["source", "harmonic"])
def test_init_is_the_image_handed_to_the_pipeline(init):
    image, mask = _scan()
    out = inpaint(_EchoPipe(), [image], [mask], [""], [0], strength=0.5, init=init, paste_back=False)[0]
    want = image if init == "source" else classical_fill(image, mask, dilate=0)
    np.testing.assert_allclose(out, want, atol=1 / 255 + 1e-6)  # 8-bit PIL hand-over
    assert np.abs(out[mask] - 0.95).max() < 0.01 if init == "source" else out[mask].max() < 0.85  # lesion gone


def test_unknown_init_is_refused():
    image, mask = _scan()
    with pytest.raises(ValueError, match="init must be one of"):
        inpaint(_EchoPipe(), [image], [mask], [""], [0], init="telea")


def test_init_matters_only_below_full_strength(tiny_sd_path):
    pipe = load_generator(tiny_sd_path)
    image, mask = _scan()
    kw = dict(steps=4, paste_back=True)
    full = [inpaint(pipe, [image], [mask], [""], [3], strength=1.0, init=i, **kw)[0] for i in ("source", "harmonic")]
    np.testing.assert_allclose(full[0], full[1], atol=1e-6)  # strength 1: pure noise whatever the init
    half = [inpaint(pipe, [image], [mask], [""], [3], strength=0.5, init=i, **kw)[0] for i in ("source", "harmonic")]
    assert np.abs(half[0] - half[1])[mask].max() > 1e-3
    for h in half:  # paste-back: the source, exactly, outside the mask
        np.testing.assert_array_equal(h[~mask], image[~mask])
