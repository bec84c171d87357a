//! PLACEHOLDER until the classifier lands: everything but a bare `SELECT 1` is dirty.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    None,
    Schema,
    Dirty,
}

pub fn effect(sql: &[u8]) -> Effect {
    if sql.eq_ignore_ascii_case(b"select 1") {
        Effect::None
    } else {
        Effect::Dirty
    }
}
