//! Grad mode as an RAII guard, so it is restored on every path out.

/// Enables (or disables) autograd for the current thread until dropped, then
/// restores the previous mode. Unlike `tch::with_grad`, this restores the mode
/// even if the code in between returns early.
pub(crate) struct GradMode {
    previous: bool,
}

impl GradMode {
    pub(crate) fn set(enabled: bool) -> Self {
        GradMode {
            previous: set_grad_enabled(enabled),
        }
    }
}

impl Drop for GradMode {
    fn drop(&mut self) {
        set_grad_enabled(self.previous);
    }
}

fn set_grad_enabled(enabled: bool) -> bool {
    // SAFETY: `at_grad_set_enabled` only flips libtorch's thread-local grad
    // mode flag and returns the previous value; it cannot fail.
    unsafe { torch_sys::at_grad_set_enabled(i32::from(enabled)) != 0 }
}

/// Whether autograd is enabled on this thread.
#[cfg(test)]
pub(crate) fn is_grad_enabled() -> bool {
    let was = set_grad_enabled(true);
    set_grad_enabled(was);
    was
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_restores_the_previous_mode() {
        let before = is_grad_enabled();
        {
            let _off = GradMode::set(false);
            assert!(!is_grad_enabled());
            {
                let _on = GradMode::set(true);
                assert!(is_grad_enabled());
            }
            assert!(!is_grad_enabled());
        }
        assert_eq!(is_grad_enabled(), before);
    }
}
