//! Node ids of a workspace's branches. The first branch a mount serves
//! (number 0) keeps the overlay's ids as they are; branch `n` (1..=63)
//! marks its ids with the top bits `10` and `n` in bits 56..61, its own id
//! in the low 55 bits and bit 55 set for its fallback ids. Ids of two
//! branches never meet, and a request names its branch by its node id.

use crate::inode::FALLBACK_BASE;

/// Branch numbers a workspace hands out: 0 and 1..=MAX_BRANCH.
pub const MAX_BRANCH: u8 = 63;

const MARK: u64 = 1 << 63;
const LOW: u64 = (1 << 55) - 1;

/// The id `id` of branch `n`'s overlay carries.
pub fn tagged(n: u8, id: u64) -> u64 {
    match n {
        0 => id,
        n => MARK | (u64::from(n) << 56) | (id & LOW),
    }
}

/// Where branch `n`'s inode table hands out fallback ids.
pub fn fallback_base(n: u8) -> u64 {
    match n {
        0 => FALLBACK_BASE,
        n => MARK | (u64::from(n) << 56) | (1 << 55),
    }
}

/// The branch number a node id belongs to.
pub fn branch_of(id: u64) -> u8 {
    match id >> 62 {
        0b10 => ((id >> 56) & 0x3f) as u8,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_of_branches_never_meet() {
        for n in 0..=MAX_BRANCH {
            for id in [2u64, 1 << 40, (1 << 62) | 12345, u64::MAX >> 2] {
                assert_eq!(branch_of(tagged(n, id)), n, "branch {n} id {id:#x}");
            }
            assert_eq!(branch_of(fallback_base(n) + 7), n);
        }
        // Branch 0's ids are the overlay's own, fallbacks included.
        assert_eq!(tagged(0, 77), 77);
        assert_eq!(branch_of(FALLBACK_BASE + 3), 0);
        assert_eq!(branch_of(crate::fs::CONTROL_ID), 0);
        // A branch's own ids and its fallbacks do not meet either.
        assert!(tagged(5, LOW) < fallback_base(5));
    }
}
