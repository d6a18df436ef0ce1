"""The page in English and Simplified Chinese, chosen from the browser's language (English otherwise).

Two ways in, one catalogue (``CATALOGUE``: a key, its English and its Chinese):

* What the page draws (labels, info texts, placeholders, buttons, headings, captions) is a key,
  ``text(key)``, which Gradio's own i18n (``gr.I18n``, given at launch: ``translations``)
  translates in the browser. A label that carries figures known when the page is built (a
  preset's size) is registered then, under a key of its own (``Phrases``).
* What the page writes while it runs (status lines, messages, the reservation note) is text, and
  ``gr.I18n`` translates only static text in the browser; so the server writes it in the visitor's
  language, ``say(key, **figures)``, read from the request's Accept-Language (the browser's
  language list, the same one the browser's i18n reads) into ``LANGUAGE`` for the call
  (``Page.process_api``). Messages the engine writes (a value out of range, a prompt too long)
  stay English.
"""

from __future__ import annotations

from contextvars import ContextVar

import gradio as gr
from gradio.i18n import I18nData

LANGUAGE: ContextVar[str] = ContextVar("nextstep_page_language", default="en")

# key -> (English, Simplified Chinese). Placeholders in braces are filled by ``say``.
CATALOGUE: dict[str, tuple[str, str]] = {
    # ---- the page's frame
    "header": ("NextStep paints an image one token at a time: watch the preview fill in, row by row.",
               "NextStep 逐个令牌地绘制图像：看着预览一行一行地填满。"),
    "tab.generate": ("Generate", "生成"),
    "tab.edit": ("Edit", "编辑"),
    "prompt": ("Prompt", "提示词"),
    "prompt.placeholder": ("Describe the image", "描述你想要的画面"),
    "run.generate": ("Generate", "生成"),
    "run.edit": ("Edit", "编辑"),
    "run.stop": ("Stop", "停止"),
    "send_to_edit": ("Send to Edit", "发送到编辑"),
    "edit.image": ("Input image", "输入图片"),
    "edit.instruction": ("Instruction", "编辑指令"),
    "edit.instruction.placeholder": ("What to change", "想要修改什么"),
    "section.settings": ("Settings", "设置"),
    "section.prompts": ("Prompts", "更多提示词"),
    "examples": ("Examples", "示例"),
    # ---- the sampling controls
    "size": ("Size (width × height)", "尺寸（宽 × 高）"),
    "num_images": ("Images", "图片数量"),
    "cfg": ("Text guidance", "文本引导强度"),
    "cfg.info": ("How strongly the image follows the text", "图片贴合文字描述的程度"),
    "cfg_img": ("Image guidance", "图像引导强度"),
    "cfg_img.info": ("How strongly the result keeps the input image", "结果保留输入图片的程度"),
    "num_sampling_steps": ("Sampling steps per token", "每个令牌的采样步数"),
    "timesteps_shift": ("Time shift", "时间偏移"),
    "cfg_schedule": ("Guidance schedule", "引导调度"),
    "cfg_schedule.constant": ("Constant", "恒定"),
    "cfg_schedule.linear": ("Linear", "线性"),
    "sampler": ("Sampler", "采样器"),
    "sampler.info": ("v1: NextStep-1's; sde, cps, ode: NextStep-1.1's",
                     "v1：NextStep-1 的采样器；sde、cps、ode：NextStep-1.1 的采样器"),
    "use_norm": ("Normalise tokens", "令牌归一化"),
    "use_norm.info": ("LayerNorm each sampled token (NextStep-1)", "对每个采样出的令牌做 LayerNorm（NextStep-1）"),
    "seed": ("Seed", "随机种子"),
    "randomize_seed": ("Randomize seed", "每次随机生成种子"),
    "negative_prompt": ("Negative prompt", "反向提示词"),
    "negative_prompt.placeholder": ("What the image should avoid", "画面中应避免的内容"),
    "positive_prompt": ("Positive (style) prompt", "正向（风格）提示词"),
    "positive_prompt.placeholder": ("Appended to the prompt", "附加在提示词之后"),
    "preview": ("Live preview", "实时预览"),
    "preview.info": ("Exact runs the VAE decoder; Fast is a nearly free colour map",
                     "精确：运行 VAE 解码器；快速：几乎不耗时的颜色映射"),
    "preview.vae": ("Exact", "精确"),
    "preview.fast": ("Fast", "快速"),
    "preview.none": ("Off", "关闭"),
    "preview_every": ("Preview every N tokens", "每 N 个令牌预览一次"),
    # ---- results
    "status": ("Status", "状态"),
    "status.ready": ("Ready.", "就绪。"),
    "gallery": ("Results (PNG with parameters)", "结果（PNG，内含生成参数）"),
    "parameters.section": ("Parameters of these results", "这些结果的参数"),
    "parameters": ("Parameters", "参数"),
    # ---- history and the edit chain
    "history": ("History of this session", "本次会话的历史"),
    "history.gallery": ("Your results, newest first (this browser tab only)", "你的结果，最新的在前（仅限此浏览器标签页）"),
    "history.use": ("Use these settings", "使用这些设置"),
    "history.edit": ("Edit this", "编辑这张"),
    "history.parameters": ("Settings of the chosen result", "所选结果的设置"),
    "history.png": ("Load settings from a PNG…", "从 PNG 读取设置…"),
    "compare": ("Before / after", "编辑前 / 编辑后"),
    "use_as_input": ("Use result as input", "将结果作为输入"),
    "undo": ("Undo last edit", "撤销上一次编辑"),
    # ---- the Model panel
    "model": ("Model", "模型"),
    "model.generate": ("**Generate tab**", "**生成**"),
    "model.edit": ("**Edit tab**", "**编辑**"),
    "model.same": ("The Edit tab uses the same model.", "编辑页使用同一个模型。"),
    "model.xlarge": ("Two models need the whole ZeroGPU GPU (`xlarge`): every request counts twice its "
                     "reservation against your quota.",
                     "两个模型需要占用整块 ZeroGPU GPU（`xlarge`）：每次请求按预留时间的两倍计入你的配额。"),
    "model.embedded": (
        "This is the small model embedded in the repository, trained on coloured shapes. To serve "
        "NextStep-1.1 on a ZeroGPU Space, set the Space variable `NEXTSTEP_MODEL` to "
        "`stepfun-ai/NextStep-1.1` and restart it (docs/deploy.md).",
        "这是仓库内置的小模型，只在彩色几何图形上训练过。若要在 ZeroGPU Space 上运行 NextStep-1.1，"
        "请把 Space 变量 `NEXTSTEP_MODEL` 设为 `stepfun-ai/NextStep-1.1` 并重启（见 docs/deploy.md）。"),
    "no_edit_model": (
        "No edit-capable model is loaded: this checkpoint takes no input image. Start the app with "
        "`--edit-model` (for example `stepfun-ai/NextStep-1-Large-Edit`) to edit images.",
        "未加载可编辑图片的模型：当前检查点不接受输入图片。请用 `--edit-model`（例如 "
        "`stepfun-ai/NextStep-1-Large-Edit`）启动应用以编辑图片。"),
    # ---- a Space whose model cannot be loaded
    "unavailable": ("**The model could not be loaded**, so this Space cannot generate images right now. The loader said:",
                    "**模型无法加载**，因此本 Space 暂时无法生成图片。加载器给出的原因："),
    "unavailable.fix": (
        "How to fix it: in the Space's settings, check the variables `NEXTSTEP_MODEL` (for example "
        "`stepfun-ai/NextStep-1.1`), `NEXTSTEP_EDIT_MODEL` and `NEXTSTEP_VAE`, and the hardware (a 14B model needs "
        "a GPU: ZeroGPU, or 48 GB for one model in bfloat16); remove the variables to serve the embedded model. "
        "Then restart the Space. docs/deploy.md has the details.",
        "修复方法：在 Space 设置中检查变量 `NEXTSTEP_MODEL`（例如 `stepfun-ai/NextStep-1.1`）、`NEXTSTEP_EDIT_MODEL` 和 "
        "`NEXTSTEP_VAE`，以及硬件（14B 模型需要 GPU：ZeroGPU，或以 bfloat16 运行单个模型需 48 GB 显存）；删除这些变量"
        "即可运行内置模型。然后重启 Space。详见 docs/deploy.md。"),
    # ---- ZeroGPU: the reservation, the quick preset, signing in
    "sign_in": ("Sign in with Hugging Face", "使用 Hugging Face 登录"),
    "quick": ("Quick look ({size}, {steps} steps)", "快速预览（{size}，{steps} 步）"),
    "quick.reserves": ("Quick look ({size}, {steps} steps · {seconds} s of GPU)",
                       "快速预览（{size}，{steps} 步 · GPU {seconds} 秒）"),
    "reserve": ("ZeroGPU: this request reserves **{seconds} s** of GPU time.",
                "ZeroGPU：本次请求将预留 **{seconds} 秒** GPU 时间。"),
    "reserve.counted": ("It counts {counted} s against your quota.", "计入你的配额 {counted} 秒。"),
    "reserve.allowance": ("{tier}: {daily} s a day, at most {per_call} s per request; about {left} s left today.",
                          "{tier}：每天 {daily} 秒，单次请求最多 {per_call} 秒；今天大约还剩 {left} 秒。"),
    "reserve.sign_in": ("Sign in for more GPU time.", "登录即可获得更多 GPU 时间。"),
    "tier.anonymous": ("Visitors not signed in", "未登录访客"),
    "tier.free": ("Signed-in visitors", "已登录用户"),
    "tier.pro": ("PRO accounts", "PRO 账户"),
    "quota.per_call": ("This request counts {counted} s of ZeroGPU time; {tier} may ask for at most {limit} s at once.",
                       "本次请求需计入 {counted} 秒 ZeroGPU 时间；{tier}单次最多可申请 {limit} 秒。"),
    "quota.per_call_unknown": ("This request counts {counted} s of ZeroGPU time, more than ZeroGPU grants you at once.",
                               "本次请求需计入 {counted} 秒 ZeroGPU 时间，超过了 ZeroGPU 单次允许你申请的上限。"),
    "quota.left": ("This request counts {counted} s of ZeroGPU time; you have about {limit} s left today.",
                   "本次请求需计入 {counted} 秒 ZeroGPU 时间；你今天大约只剩 {limit} 秒。"),
    "quota.fits": ("What fits: {fits}.", "可以这样调整：{fits}。"),
    "quota.nothing_fits": ("No smaller request of this model fits.", "该模型没有更小的请求能放得下。"),
    "quota.wait": ("Or try again in {wait}.", "或在 {wait} 后再试。"),
    "quota.space": ("ZeroGPU did not know who you are and this Space's own GPU quota is used up: open the page "
                    "on huggingface.co (signed in if you can) and try again.",
                    "ZeroGPU 无法识别你的身份，且本 Space 自身的 GPU 配额已用完：请在 huggingface.co 上打开本页"
                    "（最好先登录）后再试。"),
    "quota.runs": ("ZeroGPU says you have started too many GPU tasks for now; try again a little later.",
                   "ZeroGPU 提示你目前启动的 GPU 任务过多，请稍后再试。"),
    "quota.pending": ("Too much of your ZeroGPU time is held by tasks still running; try again once they finish.",
                      "你有太多 ZeroGPU 时间被仍在运行的任务占用，请等它们结束后再试。"),
    "quota.queue": ("No GPU became free in time; please try again later.", "没有及时等到空闲的 GPU，请稍后再试。"),
    "fit.num_images": ("1 image ({seconds} s)", "1 张图片（{seconds} 秒）"),
    "fit.num_sampling_steps": ("{value} sampling steps ({seconds} s)", "{value} 个采样步（{seconds} 秒）"),
    "fit.size": ("size {value} ({seconds} s)", "尺寸 {value}（{seconds} 秒）"),
    # ---- what a run writes
    "run.waiting": ("Waiting for the model…", "正在等待模型…"),
    "run.waiting_gpu": ("Waiting for a GPU: this request reserves {seconds} s of GPU time…",
                        "正在等待 GPU：本次请求预留 {seconds} 秒 GPU 时间…"),
    "run.progress": ("Tokens {done}/{total} · {rate} tokens/s · elapsed {elapsed} · ETA {eta}",
                     "令牌 {done}/{total} · 每秒 {rate} 个 · 已用 {elapsed} · 预计剩余 {eta}"),
    "run.done": ("Done: {total} tokens in {elapsed} ({rate} tokens/s) · seed {seed}",
                 "完成：{total} 个令牌，用时 {elapsed}（每秒 {rate} 个）· 种子 {seed}"),
    "run.stopped": ("Stopped.", "已停止。"),
    "run.failed": ("Failed: {message}", "失败：{message}"),
    "run.failed_plain": ("Failed.", "失败。"),
    # ---- the page's own messages
    "msg.empty_prompt": ("Enter a prompt first: describe the picture, or what to change in it.",
                         "请先输入提示词：描述画面，或说明要修改什么。"),
    "msg.empty_seed": ("Seed is empty: enter a whole number between 0 and {maximum}, or tick Randomize seed",
                       "随机种子为空：请输入 0 到 {maximum} 之间的整数，或勾选“每次随机生成种子”"),
    "msg.number_empty": ("{label} is empty: enter {allowed}", "{label}为空：请输入 {allowed}"),
    "msg.number_bad": ("{label} must be {allowed}, got {shown}", "{label}必须是 {allowed}，收到的是 {shown}"),
    "msg.whole_between": ("a whole number between {low} and {high}", "{low} 到 {high} 之间的整数"),
    "msg.number_between": ("a number between {low} and {high}", "{low} 到 {high} 之间的数"),
    "msg.choice": ("{label} must be one of {choices}: {got}", "{label}必须是以下之一：{choices}（{got}）"),
    "msg.choice_empty": ("it is empty", "当前为空"),
    "msg.choice_got": ("got {value}", "收到的是 {value}"),
    "msg.not_uploaded": (
        "The input image must be a file uploaded through this page or its API (gradio_client's handle_file), "
        "or a picture sent inline as a base64 data: URL.",
        "输入图片必须是通过本页面或其 API 上传的文件（gradio_client 的 handle_file），或以 base64 data: URL "
        "内联发送的图片。"),
    "msg.unreadable_image": ("The input image could not be read: {error}.", "无法读取输入图片：{error}。"),
    "msg.add_image": ("Add an input image first (upload, paste or take a photo).", "请先添加输入图片（上传、粘贴或拍照）。"),
    "msg.dropped": ("The request was dropped: nobody read its result.", "请求已被丢弃：没有人读取它的结果。"),
    "msg.size_not_offered": ("This model does not offer the size {value}; the size was left as it is.",
                             "该模型不提供尺寸 {value}，尺寸保持不变。"),
    "msg.png_unreadable": ("That PNG's settings could not be read: {error}", "无法读取该 PNG 中的设置：{error}"),
    "msg.not_png": ("That file could not be read as a PNG.", "无法将该文件作为 PNG 读取。"),
    "msg.no_settings": ("That picture carries no NextStep settings: only PNGs made by this app or its command line "
                        "do (or ones with AUTOMATIC1111-style parameters).",
                        "这张图片不含 NextStep 设置：只有本应用或其命令行生成的 PNG（或带 AUTOMATIC1111 格式参数的 PNG）"
                        "才有。"),
    "msg.settings_loaded": ("Settings loaded into the {tab} tab.", "设置已载入“{tab}”页。"),
    "msg.nothing_to_undo": ("Nothing to undo: the input is where the edit chain started.", "没有可撤销的：输入已是编辑链的起点。"),
    "msg.nothing_to_reuse": ("Nothing to reuse yet: generate an image first.", "还没有可复用的结果：请先生成一张图片。"),
    "msg.choose_history": ("Choose a result in the history first.", "请先在历史中选择一个结果。"),
    "history.caption": ("{tab} · seed {seed} · {prompt}", "{tab} · 种子 {seed} · {prompt}"),
}


def language_of(accept_language: str | None) -> str:
    """The page's language for an Accept-Language header: the first of its tags we have (any
    Chinese gets Simplified Chinese), else English."""
    for tag in (part.split(";")[0].strip().lower() for part in (accept_language or "").split(",")):
        if tag.startswith("zh"):
            return "zh-CN"
        if tag.startswith("en"):
            return "en"
    return "en"


def in_language(pair: tuple[str, str]) -> str:
    """The one of an (English, Chinese) pair in the current call's language."""
    english, chinese = pair
    return chinese if LANGUAGE.get() == "zh-CN" else english


def say(key: str, **figures) -> str:
    """The catalogue's text for ``key`` in the current call's language, with ``figures`` filled in."""
    return in_language(CATALOGUE[key]).format(**figures)


def text(key: str) -> I18nData:
    """What a component shows for ``key``: translated by Gradio in the browser."""
    if key not in CATALOGUE and key not in Phrases.registered:
        raise KeyError(f"no translation for {key!r}")
    return I18nData(key)


def english_text(key: str) -> str:
    """A key's English, for what is not shown in a browser (the API's description)."""
    return (CATALOGUE.get(key) or Phrases.registered.get(key) or (key,))[0]


def shown(value) -> str:
    """A component's label as the current call's language writes it (for messages naming it)."""
    if isinstance(value, I18nData):
        return say(value.key) if value.key in CATALOGUE else Phrases.say(value.key)
    return str(value)


class Phrases:
    """Labels with figures known when the page is built, registered under keys of their own so
    that Gradio's i18n translates them like any other."""

    registered: dict[str, tuple[str, str]] = {}

    @classmethod
    def text(cls, key: str, **figures) -> I18nData:
        english, chinese = CATALOGUE[key]
        name = key + "|" + "|".join(f"{k}={v}" for k, v in sorted(figures.items()))
        cls.registered[name] = (english.format(**figures), chinese.format(**figures))
        return I18nData(name)

    @classmethod
    def say(cls, name: str) -> str:
        return in_language(cls.registered[name])


def translations() -> gr.I18n:
    """Every key in both languages, for ``Blocks.launch(i18n=...)``: Simplified Chinese serves
    ``zh-CN`` and any other Chinese locale (``zh``)."""
    entries = {**CATALOGUE, **Phrases.registered}
    english = {key: pair[0] for key, pair in entries.items()}
    chinese = {key: pair[1] for key, pair in entries.items()}
    return gr.I18n(en=english, **{"zh-CN": chinese, "zh": chinese})
