"""Results turned back into settings: PNG parameters in both chunks, the bounded history, and the
MCP tools for agents."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx
import pytest
from gradio_client import Client
from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client
from PIL import Image, PngImagePlugin

from nextstep.page.layout import build_demo, launch
from nextstep.page.reuse import add_to_history
from nextstep.pnginfo import (
    JSON_KEY,
    TEXT_KEY,
    from_text,
    read_parameters,
    save_with_parameters,
)

from ..pages import GENERATE, final_images, free_port, tiny_services

QUICK = dict(GENERATE, size="64x64", num_sampling_steps=2, preview="none", negative_prompt="blurry, dark",
             positive_prompt='oil painting, "impasto"')


@pytest.fixture(scope="module")
def server():
    """The app with its MCP server on (``--mcp``)."""
    demo = build_demo(tiny_services(), mcp=True)
    _, url, _ = launch(demo, "127.0.0.1", free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield url
    finally:
        demo.close()


@pytest.mark.slow
def test_a_result_png_carries_both_chunks_and_they_agree(server):
    [path] = final_images(Client(server, verbose=False).predict(**QUICK, api_name="/generate"))
    info = Image.open(path).info
    ours, text = json.loads(info[JSON_KEY]), info[TEXT_KEY]
    assert text.startswith("a red circle\nNegative prompt: blurry, dark\nSteps: 2, Sampler: v1, CFG scale: 3.0, Seed: 7")
    assert "Size: 64x64" in text
    assert from_text(text) == ours, "the plain-text chunk reads back to every setting"
    assert read_parameters(path) == ours


def test_reading_takes_either_chunk_and_the_earlier_json(tmp_path):
    parameters = dict(prompt="a red circle", negative_prompt="", size="128x64", num_sampling_steps=20, seed=3,
                      cfg=3.0, sampler="v1", edit=False)
    save_with_parameters(Image.new("RGB", (8, 8)), parameters, tmp_path / "both.png")
    assert read_parameters(tmp_path / "both.png") == parameters
    for name, chunks in {
        "text-only.png": {TEXT_KEY: Image.open(tmp_path / "both.png").info[TEXT_KEY]},
        "earlier.png": {TEXT_KEY: json.dumps(dict(parameters, size=None, hw=[64, 128]))},
    }.items():
        info = PngImagePlugin.PngInfo()
        for key, value in chunks.items():
            info.add_text(key, value)
        Image.new("RGB", (8, 8)).save(tmp_path / name, pnginfo=info)
        read = read_parameters(tmp_path / name)
        assert {k: read[k] for k in parameters} == parameters, name
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    assert read_parameters(tmp_path / "plain.png") is None
    broken = PngImagePlugin.PngInfo()
    broken.add_text(JSON_KEY, "{not json")
    Image.new("RGB", (8, 8)).save(tmp_path / "broken.png", pnginfo=broken)
    with pytest.raises(ValueError, match="could not be read"):
        read_parameters(tmp_path / "broken.png")


def test_history_is_bounded_newest_first(tmp_path):
    paths = []
    for seed in range(5):
        path = tmp_path / f"{seed}.png"
        save_with_parameters(Image.new("RGB", (16, 16)), dict(prompt="p", seed=seed), path)
        paths.append(str(path))
    history = []
    for path in paths:
        history = add_to_history(history, "generate", [path], max_entries=3)
    assert [entry.parameters["seed"] for entry in history] == [4, 3, 2]
    # 16x16 RGB is 768 bytes: a budget of two pictures keeps two, however many entries are allowed.
    assert len(add_to_history(history, "edit", paths[:1], max_bytes=2 * 768)) == 2


async def mcp_session(url: str, work):
    async with streamablehttp_client(url + "gradio_api/mcp/") as (read, write, _):
        async with ClientSession(read, write) as session:
            await session.initialize()
            return await work(session)


@pytest.mark.slow
def test_the_mcp_server_lists_the_two_tools_and_a_call_returns_an_image(server):
    tools = {tool.name: tool for tool in asyncio.run(mcp_session(server, lambda s: s.list_tools())).tools}
    assert set(tools) == {"generate_image", "edit_image"}
    generate = tools["generate_image"].inputSchema["properties"]
    assert {"prompt", "size", "num_sampling_steps", "cfg", "seed", "randomize_seed"} <= set(generate)
    assert "what the image should show" in generate["prompt"]["description"]
    assert {"image", "prompt", "cfg_img"} <= set(tools["edit_image"].inputSchema["properties"])
    for tool in tools.values():
        described = {name: p.get("description") for name, p in tool.inputSchema["properties"].items()}
        assert all(described.values()), f"{tool.name}: parameters without a description: {described}"
        assert "upload" not in tool.description, "no upload tool is offered"
    image = tools["edit_image"].inputSchema["properties"]["image"]
    assert image["type"] == "string" and "data: URL" in image["description"] and "http" not in str(image)

    arguments = dict(prompt="a red circle", size="64x64", num_sampling_steps=2, seed=3, randomize_seed=False)
    result = asyncio.run(mcp_session(server, lambda s: s.call_tool("generate_image", arguments)))
    assert not result.isError
    images = [content for content in result.content if content.type == "image"]
    assert len(images) == 1 and images[0].mimeType == "image/png"
    png = Image.open(io.BytesIO(base64.b64decode(images[0].data)))
    assert json.loads(png.info[JSON_KEY])["seed"] == 3 and png.info[TEXT_KEY], "the image carries both chunks"
    [text] = [content.text for content in result.content if content.type == "text"]
    assert json.loads(text) == json.loads(png.info[JSON_KEY]), "and its parameters come as JSON beside it"
    assert "/" not in json.loads(text)["model"] and "/tmp" not in text and "file=" not in text


@pytest.mark.slow
def test_an_mcp_edit_takes_a_data_url_and_refuses_a_web_address(server):
    picture = io.BytesIO()
    Image.new("RGB", (64, 64), "orange").save(picture, "PNG")
    url = "data:image/png;base64," + base64.b64encode(picture.getvalue()).decode()
    arguments = dict(prompt="make it blue", size="64x64", num_sampling_steps=2, seed=3, randomize_seed=False)
    result = asyncio.run(mcp_session(server, lambda s: s.call_tool("edit_image", dict(arguments, image=url))))
    assert not result.isError and [content for content in result.content if content.type == "image"]
    result = asyncio.run(mcp_session(server, lambda s: s.call_tool(
        "edit_image", dict(arguments, image="http://127.0.0.1:9/picture.png"))))
    assert result.isError and "data: URL" in str(result.content)


@pytest.mark.slow
def test_without_mcp_there_are_no_tools():
    demo = build_demo(tiny_services())
    _, url, _ = launch(demo, "127.0.0.1", free_port(), prevent_thread_lock=True, quiet=True)
    try:
        endpoints = Client(url, verbose=False).view_api(print_info=False, return_format="dict")["named_endpoints"]
        assert set(endpoints) == {"/generate", "/edit"}
        assert httpx.get(url + "gradio_api/mcp/schema").status_code == 404
    finally:
        demo.close()
