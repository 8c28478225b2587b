"""The endpoint's wire format (deployments/openai_api.py): requests checked against the deployment's
caps and the served model's card, and turned into the `GenerationRequest` the model sees. No Ray."""

import pytest
from PIL import Image
from pydantic import ValidationError

from deployments.openai_api import ImageEditRequest, ImageGenerationRequest, ModelCard
from deployments.text_to_image import AppArgs
from socarrat.config import SamplerSpec

CARD = ModelCard(id="m", created=0, digest="d", size_px=32, downsampling=8, family="gaussian", max_steps=100)
TOKEN_CARD = CARD.model_copy(update={"family": "token", "size_px": 64})


def test_steps_are_capped_by_the_model_as_well_as_the_deployment():
    context = {"args": AppArgs(max_steps=1000), "card": CARD}
    assert ImageGenerationRequest.model_validate({"prompt": "x", "steps": 100}, context=context).steps == 100
    with pytest.raises(ValidationError, match="more than this model can take"):
        ImageGenerationRequest.model_validate({"prompt": "x", "steps": 101}, context=context)


def test_picard_windows_fit_the_images_per_model_call():
    def window(**fields) -> int | None:
        context = {"args": AppArgs(max_batch_images=16), "card": CARD}
        return ImageGenerationRequest.model_validate({"prompt": "x", "picard": True, **fields}, context=context).window

    assert window() == 16 and window(n=4) == 4  # None: the most that fit, as SamplerSpec's 32 would not
    assert window(n=4, window=50, steps=4) == 50  # a round holds min(window, steps) states per image
    with pytest.raises(ValidationError, match="5 x 4 images per model call, over this deployment's cap of 16"):
        window(n=4, window=5)  # the model's own ddim takes 50 steps


def test_a_request_becomes_n_prompts_with_consecutive_seeds_and_its_size():
    body = {"prompt": "two blue squares", "n": 3, "seed": 7, "size": "64x32", "guidance_scale": 2, "steps": 20}
    request = ImageGenerationRequest.model_validate(body, context={"args": AppArgs(), "card": CARD}).generation_request()
    assert request.prompts == ["two blue squares"] * 3 and request.seeds == [7, 8, 9]
    assert request.spec == SamplerSpec(steps=20, guidance=2, width_px=64, height_px=32)  # the rest: defaults
    unseeded = ImageGenerationRequest.model_validate({"prompt": "x", "n": 2}, context={"args": AppArgs(), "card": CARD})
    first, second = unseeded.generation_request().seeds
    assert second == first + 1 and 0 <= first < 2**63 - 1


@pytest.mark.parametrize("size", ["60x64", "64", "8x1024", "auto64"])
def test_sizes_must_be_multiples_of_the_models_downsampling_within_the_cap(size):
    with pytest.raises(ValidationError, match="multiple of 8 from 8 to 512"):
        ImageGenerationRequest.model_validate({"prompt": "x", "size": size}, context={"args": AppArgs(), "card": CARD})


def test_an_edit_paints_the_masks_transparent_pixels():
    image = Image.new("RGB", (64, 64), "white")
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 64))  # the left half transparent: paint it anew
    context = {"args": AppArgs(), "card": TOKEN_CARD, "image": image, "mask": mask}
    edit = ImageEditRequest.model_validate({"prompt": "a red circle", "n": 2}, context=context).edit()
    assert len(edit.images) == len(edit.masks) == 2 and edit.start_step == 0
    assert edit.masks[0].getpixel((10, 10)) == 255 and edit.masks[0].getpixel((50, 10)) == 0
    with pytest.raises(ValidationError, match="no fully transparent pixel"):
        ImageEditRequest.model_validate({"prompt": "x"}, context={**context, "mask": Image.new("RGBA", (64, 64), "black")})
    with pytest.raises(ValidationError, match="need a token-family model"):
        ImageEditRequest.model_validate({"prompt": "x"}, context={**context, "card": CARD})
