"""Errors of the emulator itself. A HarnessError is never a kernel finding."""


class HarnessError(Exception):
    """The farm failed (bad profile, broken image, emulator fault); not the kernel's doing."""


class ProfileError(HarnessError):
    """A target profile is missing, malformed or names things the image lacks."""


class ImageError(HarnessError):
    """A kernel image cannot be loaded."""


class InputError(HarnessError):
    """An input cannot be handed to the kernel at all (for example, larger than the ramdisk)."""
