/*
 * bin/init template for the seed corpus.
 *
 * The farm stops at the kernel's ring-3 entry, so none of this ever runs. It is still a real
 * little program, so every seed carries the text, rodata, data and bss shapes gcc gives a
 * static executable rather than hand-written filler.
 *
 * Symbols the seed builder relies on:
 *   _start      the usual entry, first in .text (its own input section sorts first)
 *   init_main   an entry point in the middle of .text
 *   far_entry   4 bytes of code in .far.text, which a layout may give a segment of its own
 *   scratch     the whole .bss, INIT_BSS bytes (no .bss at all when INIT_BSS is 0)
 */

#ifndef INIT_BSS
#define INIT_BSS 0x2000
#endif

/* An ELF note; only layouts with a PT_NOTE keep it. */
struct init_note {
    unsigned int namesz;
    unsigned int descsz;
    unsigned int type;
    char name[8];
    unsigned int desc[2];
};

static const struct init_note note
    __attribute__((used, section(".note.rustux"), aligned(4))) = {7, 8, 1, "Rustux", {1, 0}};

#ifdef GNU_NOTES
/* The ABI tag glibc's crt1 brings: type 1 (NT_GNU_ABI_TAG), OS 0 (Linux), kernel 3.2.0. */
struct abi_note {
    unsigned int namesz;
    unsigned int descsz;
    unsigned int type;
    char name[4];
    unsigned int desc[4];
};

static const struct abi_note abi_tag
    __attribute__((used, section(".note.ABI-tag"), aligned(4))) = {4, 16, 1, "GNU", {0, 3, 2, 0}};
#endif

static const char banner[] __attribute__((used)) = "rustux init: seed corpus template";
static const unsigned short primes[] = {2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37};

/* Non-zero so it lands in .data, not .bss. */
unsigned long boot_counter = 1;
#if INIT_BSS > 0
unsigned char scratch[INIT_BSS];
#endif

static unsigned long mix(unsigned long hash, unsigned long value)
{
    hash ^= value;
    return hash * 0x100000001b3UL;
}

__attribute__((noinline)) unsigned long checksum(void)
{
    unsigned long hash = boot_counter;
    for (unsigned int i = 0; i < sizeof primes / sizeof primes[0]; i++)
        hash = mix(hash, primes[i]);
#if INIT_BSS > 0
    /* a stride a compiler will not turn into a memset call, which -nostdlib could not link */
    for (unsigned long i = 0; i < sizeof scratch; i += 64)
        scratch[i] = (unsigned char)hash;
#endif
    return hash;
}

__attribute__((noreturn)) void init_main(void)
{
    for (;;) {
        boot_counter += checksum();
        __asm__ volatile("pause" : : "r"(banner) : "memory");
    }
}

__attribute__((noreturn, section(".text.start"))) void _start(void)
{
    init_main();
}

__attribute__((noreturn, section(".far.text"))) void far_entry(void)
{
    for (;;)
        __asm__ volatile("pause" : : : "memory");
}
