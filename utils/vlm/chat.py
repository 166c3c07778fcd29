"""Chat with a vision-language model about images: utils/generation/chat.py's session, prompts built by mlx-vlm.

The images given at the start (utils/inference.py --image) belong to the first user turn for the whole
conversation. Every turn is prefilled whole (images included): the engine's kept KV cache holds text
models' caches only.
"""

from __future__ import annotations

from typing import Optional

from mlx_grpo.generation.chat import ChatSession, GenerationOptions, ReplyStream
from mlx_grpo.vlm.model import VlmPolicy, build_vlm_prompt, check_images


class VlmChatSession(ChatSession):
    def __init__(self, policy: VlmPolicy, tokenizer, options: GenerationOptions, images=(),
                 system: Optional[str] = None):
        self.model = policy
        self.tokenizer = tokenizer
        self.options = options
        self.system = system
        self.images = check_images(images)
        self.messages = []
        self.cache = None

    def prompt_tokens(self, user_text: str):
        return build_vlm_prompt(self.model, user_text, self.images, system=self.system, history=self.messages)

    def reply_stream(self, user_text: str) -> ReplyStream:
        return ReplyStream(self.model, self.tokenizer, self.prompt_tokens(user_text), self.options)

    def ask(self, user_text: str):
        stream = self.reply_stream(user_text)
        reply = stream.run()
        self.commit(user_text, reply)
        return reply
