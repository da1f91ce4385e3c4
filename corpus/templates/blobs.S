/*
 * Numbered extra sections, .blob.0 to .blob.<BLOB_COUNT - 1>, for layouts with more PT_LOADs
 * than a small C program has sections. The kind cycles with the index (the seed builder
 * assumes the same cycle when it picks segment flags):
 *   index % 4 == 0  code: blob_code_<index> spins, then int3 padding
 *   index % 4 == 1  read-only data
 *   index % 4 == 2  data, followed by .blob.<index>.bss (BSS in the same segment)
 *   index % 4 == 3  .blob.<index>.bss only (a segment with p_filesz 0)
 * Sizes grow with the index so that no two segments look alike. The BSS sections keep
 * alignment 1: the builder lines the next segment up with the file offset, which a padded
 * BSS start would throw off.
 */

#ifndef BLOB_COUNT
#define BLOB_COUNT 4
#endif

        .altmacro
        .macro blob index
        .if (\index % 4) == 0
        .section .blob.\index, "ax", @progbits
        .globl blob_code_\index
blob_code_\index:
        pause
        jmp     blob_code_\index
        .fill   0x1c + 0x10 * \index, 1, 0xcc
        .elseif (\index % 4) == 1
        .section .blob.\index, "a", @progbits
        .quad   0x424f4c4200000000 + \index
        .fill   0x18 + 0x18 * \index, 1, \index
        .elseif (\index % 4) == 2
        .section .blob.\index, "aw", @progbits
        .quad   \index
        .fill   0x10 + 0x10 * \index, 1, 0x5a
        .section .blob.\index\().bss, "aw", @nobits
        .skip   0x100 + 0x90 * \index
        .else
        .section .blob.\index\().bss, "aw", @nobits
        .skip   0x300 + 0x1a0 * \index
        .endif
        .endm

        .set    blob_index, 0
        .rept   BLOB_COUNT
        blob    %blob_index
        .set    blob_index, blob_index + 1
        .endr

        .section .note.GNU-stack, "", @progbits
