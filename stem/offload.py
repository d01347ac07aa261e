"""CPU offload for small GPUs, through accelerate's hooks: only the component that runs is on the GPU.

`Offload(parts, device)` keeps the UNet, the VAE and the text encoder on the CPU and moves each one
to the GPU when it is called (for the VAE, `encode`/`decode`, which diffusers routes through the same
hook), first sending whichever other component is there back to the CPU, like diffusers'
`enable_model_cpu_offload`. A ControlNet (`add_beside_unet`) takes its turn with the UNet: it moves to
the GPU when it runs and stays there while the UNet runs, as diffusers' ControlNet pipelines keep
it, and goes back to the CPU when the VAE or the text encoder runs. When even the UNet's weights and one
frame do not fit, `stream_unet(True)` switches the UNet to accelerate's sequential offload: its weights
stay on the CPU and each layer's are copied to the GPU for its own call (much slower; the memory plan
asks for it only when needed).
"""

from __future__ import annotations

import torch
from accelerate.hooks import CpuOffload, add_hook_to_module, remove_hook_from_module


def _on_device(module, device: torch.device) -> bool:
    """Whether `module`'s weights are on the (accelerator) `device`; "cuda" and "cuda:0" alike."""
    parameter = next(module.parameters(), None)
    return parameter is not None and device.type != "cpu" and parameter.device.type == device.type


class _OneOnDevice(CpuOffload):
    """accelerate's CpuOffload that first sends the other components of the model back to the CPU."""

    def __init__(self, execution_device, group: list, partners: list | None = None):
        super().__init__(execution_device=execution_device)
        self.group = group  # the modules taking turns on the device
        self.partners = partners if partners is not None else []  # modules that stay on the device beside this one

    def pre_forward(self, module, *args, **kwargs):
        for other in self.group:
            if other is not module and not any(other is p for p in self.partners) and \
                    _on_device(other, torch.device(self.execution_device)):
                other.to("cpu")
        return super().pre_forward(module, *args, **kwargs)


class Offload:
    """The components of `StableDiffusionParts` take turns on `device`; see the module docstring."""

    def __init__(self, parts, device):
        self.device = torch.device(device)
        self.unet = parts.unet
        self.group = [parts.text_encoder, parts.vae, parts.unet]
        self.unet_partners: list = []  # modules that run with the UNet (a ControlNet)
        for module in self.group:
            partners = self.unet_partners if module is self.unet else None
            add_hook_to_module(module, _OneOnDevice(self.device, self.group, partners))  # moves it to the CPU
        self.streaming = False

    def add_beside_unet(self, module) -> None:
        """Offload `module` (a ControlNet) too: on the GPU when it runs, kept there while the UNet runs."""
        if any(module is m for m in self.group):
            return
        self.group.append(module)
        self.unet_partners.append(module)
        add_hook_to_module(module, _OneOnDevice(self.device, self.group, [self.unet]))  # moves it to the CPU

    def stream_unet(self, on: bool) -> None:
        """Stream the UNet's weights layer by layer (True) or move the whole UNet in turn (False)."""
        from accelerate import cpu_offload

        if on == self.streaming:
            return
        remove_hook_from_module(self.unet, recurse=True)  # restores streamed weights to the CPU
        if on:
            self.group.remove(self.unet)
            cpu_offload(self.unet, execution_device=self.device)
        else:
            self.group.append(self.unet)
            add_hook_to_module(self.unet, _OneOnDevice(self.device, self.group, self.unet_partners))
        self.streaming = on

    def remove(self) -> None:
        """Take the hooks off and put every component on the device again."""
        self.stream_unet(False)
        for module in self.group:
            remove_hook_from_module(module)
            module.to(self.device)


def execution_device(module) -> torch.device:
    """Where `module` computes: its offload hook's execution device, else the device of its weights."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", [hook]):
        device = getattr(h, "execution_device", None)
        if device is not None:
            return torch.device(device)
    return next(module.parameters()).device
